"""Correctness of the compiled kernels on a CUDA GPU at real vocabulary sizes, against float64 PyTorch.

The test suite checks the kernels under TRITON_INTERPRET=1 on small sizes; the compiled GPU code can still differ
(32-bit offset overflow on large N x V, bf16 conversions, default block sizes that the tests never use). Run this
once on every GPU before timing anything:

    python benchmarks/check_cuda.py            # V = 151936 (Qwen2.5), every preset, fp32 and bf16; exits 1 on failure
    TRITON_INTERPRET=1 python benchmarks/check_cuda.py --smoke   # every check at tiny sizes on the CPU (a CI test:
                                               # the script's own logic is checked before it costs GPU time)

Each line: op, preset, dtype, relative error of the loss (against the size of its terms) and of each gradient
(max |err| / max |ref|), and the tolerance of the core issue (1e-5 fp32, 2e-2 bf16).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _bench_common import alias  # noqa: E402

from fastupg.estimator import PRESETS, Estimator  # noqa: E402
from fastupg.kernels import (fused_linear_logprobs, fused_linear_policy_loss, fused_policy_loss,  # noqa: E402
                             token_logprobs)
from fastupg.kernels._logits_triton import LAST_LAUNCH  # noqa: E402
from fastupg.kernels.logits import SPLIT  # noqa: E402
from fastupg.kernels.torch_reference import fused_policy_loss_ref, token_logprobs_ref  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
TEMP = 0.7
failures: list[str] = []


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def report(op, name, dtype, errs: dict, tol):
    ok = all(e <= tol for e in errs.values())
    line = f"{'ok ' if ok else 'BAD'} {op:<22} {name:<8} {str(dtype)[6:]:<8} " + \
        " ".join(f"{k}={v:.1e}" for k, v in errs.items()) + f"  (tol {tol:g})"
    print(line, flush=True)
    if not ok:
        failures.append(line)


def batch(est: Estimator, B, T, V, dev, g):
    logits = torch.randn(B, T, V, generator=g, device=dev) * 2.0
    targets = torch.randint(0, V, (B, T), generator=g, device=dev)
    lp = torch.log_softmax(logits.double() / TEMP, -1).gather(-1, targets[..., None])[..., 0].float()
    kw = dict(advantages=torch.randn(B, T, generator=g, device=dev))
    mask = torch.rand(B, T, generator=g, device=dev) > 0.2
    kw["mask"] = mask
    if est.online is not None and est.online.needs_old:
        kw["old_logp"] = lp + 0.5 * torch.randn(B, T, generator=g, device=dev)  # clipping on both sides
    if est.online is not None and est.offline is not None:
        off = torch.zeros(B, T, dtype=torch.bool, device=dev)
        off[-1] = True
        kw["offline"] = off
    kw["weight"] = torch.rand(B, T, generator=g, device=dev) + 0.5
    kw["seq_ids"] = torch.arange(B, device=dev)[:, None].expand(B, T).contiguous()
    return logits, targets, kw


def loss_err(loss, ref, kw):
    m = kw["mask"].double()
    size = max(abs(ref.item()), ((kw["advantages"].abs().double() * m).sum() / m.sum()).item())
    return abs(loss.item() - ref.item()) / size


def check_logits_ops(dev, V=151936, B=2, T=192, large=True):
    g = torch.Generator(device=dev).manual_seed(0)
    default = dict(SPLIT)  # the launch configuration every variant below starts from and returns to
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(B, T, V, generator=g, device=dev) * 3).to(dtype)
        y = torch.randint(0, V, (B, T), generator=g, device=dev)
        gl, ge = torch.randn(B, T, generator=g, device=dev), torch.randn(B, T, generator=g, device=dev)
        z = logits.clone().requires_grad_()
        lp, ent = token_logprobs(z, y, TEMP, return_entropy=True)
        zr = logits.double().requires_grad_()
        lr, er = token_logprobs_ref(zr, y, TEMP, return_entropy=True)
        (lp * gl + ent * ge).sum().backward()
        (lr * gl + er * ge).sum().backward()
        report("token_logprobs", "-", dtype, dict(logp=rel(lp, lr), ent=rel(ent, er), dz=rel(z.grad, zr.grad)),
               TOL[dtype])
        del z, zr, logits
        for name in sorted(PRESETS):
            est = Estimator.preset(name, entropy_coef=0.01)
            if est.agg.endswith("token-sum-norm"):
                est = Estimator.preset(name, entropy_coef=0.01, agg_norm=float(T))
            logits, targets, kw = batch(est, B, T, V, dev, g)
            logits = logits.to(dtype)
            logits[~kw["mask"]] = float("nan")  # masked rows are never read: nan there changes nothing
            if est.sequence_level:
                logits = torch.nan_to_num(logits, nan=0.0)  # (GSPO goes through token_logprobs: every row read)
            zr = logits.double().requires_grad_()
            loss_r, met_r = fused_policy_loss_ref(zr, targets, est, temperature=TEMP, **kw)
            loss_r.backward()
            variants = [("", {})]
            if name in ("grpo", "hpt", "luffy"):  # (each variant compiles its own kernels: a few presets)
                # launch forms other than the default: the one-launch form (ticket order, atomics, waits: what the
                # interpreter runs in order and so never races) at the default lag, in place (the gradient part
                # must not overwrite a chunk before its stats were read), and at lag 1, where nearly every gradient
                # program waits for a row whose last stats program has just arrived (memory ordering under load);
                # and the three-launch form if the default is the one-launch one
                one = dict(one_launch=True, chunk=1024, warps=4)
                variants += [("+deferred", dict(check="deferred")), ("+inplace", dict(inplace_backward=True)),
                             ("+1launch", dict(_split=one)),
                             ("+1launch+inplace", dict(inplace_backward=True, _split=one)),
                             ("+1launch-lag1+inplace", dict(inplace_backward=True, _split=dict(one, lag=1, warps=1))),
                             ("+1launch-nograd", dict(_split=one, _nograd=True))]  # (no gradient part: lag 0)
                if default["one_launch"]:
                    variants.append(("+3launch", dict(_split=dict(one_launch=False))))
            for tag, extra in variants:
                SPLIT.clear()
                SPLIT.update(default, **extra.pop("_split", {}))
                LAST_LAUNCH.clear()
                nograd = extra.pop("_nograd", False)
                leaf = logits.clone().requires_grad_(not nograd)
                z = alias(leaf) if extra.get("inplace_backward") else leaf
                with torch.set_grad_enabled(not nograd):
                    loss, met = fused_policy_loss(z, targets, est, temperature=TEMP, **kw, **extra)
                errs = dict(loss=loss_err(loss, loss_r, kw))
                if not nograd:
                    loss.backward()
                    errs["dz"] = rel(leaf.grad, zr.grad)
                errs["metrics"] = max(abs(float(met[k]) - float(met_r[k])) / max(1.0, abs(float(met_r[k])))
                                      for k in met_r)
                if "launch" in tag:  # the form named must be the one that ran
                    ran = LAST_LAUNCH.get("form")
                    errs["form_ran"] = 0.0 if ran == ("three" if "3launch" in tag else "one") else float("inf")
                report("fused_policy_loss" + tag, name, dtype, errs, TOL[dtype])
                del z, leaf
            SPLIT.clear()
            SPLIT.update(default)
            from fastupg.kernels.logits import raise_deferred_checks  # noqa: PLC0415
            raise_deferred_checks()
            del zr, logits
            torch.cuda.empty_cache()
    if large:
        check_logits_large(dev)


def check_logits_large(dev, V=151936, B=4, T=8192, rows_per_block=1024, min_elems=2 ** 31, first_past=None):
    """N x V > 2^31 (32k tokens x 151936 = 4.98e9 logits) through both logits ops, fp32 and bf16, against a float64
    oracle built block of rows by block of rows: every token's log-prob and entropy, the loss and the metrics, and the
    gradient of selected rows on both sides of the 2^31-element boundary (row 14134 is the first past it) and at
    the end. The oracle's row gradient is the chain rule in float64: dL/dl_t (onehot - p) / T - dL/dH_t p (log p + H)
    / T, with dL/dl_t and dL/dH_t from fastupg.policy_loss's autograd on float64 log-probs and entropies."""
    from fastupg import policy_loss  # noqa: PLC0415
    N = B * T
    assert N * V > min_elems
    g = torch.Generator(device=dev).manual_seed(5)
    est = Estimator.preset("grpo", entropy_coef=0.01)
    first_past = first_past or 2 ** 31 // V + 1
    rows = torch.tensor([0, 1, first_past - 2, first_past - 1, first_past, first_past + 1, N // 2, N - 2, N - 1],
                        device=dev)
    rows = torch.unique(rows[rows < N])
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(B, T, V, generator=g, device=dev) * 3).to(dtype)
        y = torch.randint(0, V, (B, T), generator=g, device=dev)
        lp64 = torch.empty(N, dtype=torch.float64, device=dev)
        en64 = torch.empty(N, dtype=torch.float64, device=dev)
        zf, yf = logits.view(N, V), y.view(N)
        for i in range(0, N, rows_per_block):
            lq = torch.log_softmax(zf[i:i + rows_per_block].double() / TEMP, -1)
            lp64[i:i + rows_per_block] = lq.gather(1, yf[i:i + rows_per_block, None])[:, 0]
            en64[i:i + rows_per_block] = -(lq.exp() * lq).sum(-1)
            del lq
        adv = torch.randn(B, T, generator=g, device=dev)
        old = (lp64.view(B, T) + 0.5 * torch.randn(B, T, generator=g, device=dev, dtype=torch.float64)).float()
        mask = torch.rand(B, T, generator=g, device=dev) > 0.1
        mask.view(-1)[rows] = True
        kw = dict(advantages=adv, old_logp=old, mask=mask)
        l_leaf, h_leaf = lp64.clone().view(B, T).requires_grad_(), en64.clone().view(B, T).requires_grad_()
        loss_r, met_r = policy_loss(l_leaf, est, entropy=h_leaf, **kw)
        loss_r.backward()
        dl, dh = l_leaf.grad.view(N), h_leaf.grad.view(N)

        def grad_rows(coef_l, coef_h):
            zr = zf[rows].double() / TEMP
            lq = torch.log_softmax(zr, -1)
            p = lq.exp()
            H = -(p * lq).sum(-1, keepdim=True)
            onehot = torch.zeros_like(p).scatter_(1, yf[rows, None], 1.0)
            return (coef_l[rows, None] * (onehot - p) - coef_h[rows, None] * p * (lq + H)) / TEMP

        z = logits.requires_grad_()
        default = dict(SPLIT)
        for form in ("default", "one_launch"):  # (the one-launch form's tickets and rows also cross 2^31 elements)
            SPLIT.update(default, **({} if form == "default" else dict(one_launch=True, chunk=1024, warps=4)))
            loss, met = fused_policy_loss(z, y, est, temperature=TEMP, **kw)
            loss.backward()
            # clip fractions: a token whose ratio sits on a clip bound may flip with fp32 rounding of its log-prob;
            # at 32k tokens one flip moves a fraction by 3e-5, so they are compared in tokens (at most 3 flips)
            n_on = float(met_r["tokens/online"])
            flips = max(abs(float(met[k]) - float(met_r[k])) * n_on for k in met_r if k.startswith("clip_ratio"))
            errs = dict(loss=loss_err(loss, loss_r, kw), dz_rows=rel(z.grad.view(N, V)[rows], grad_rows(dl, dh)),
                        metrics=max(abs(float(met[k]) - float(met_r[k])) / max(1.0, abs(float(met_r[k])))
                                    for k in met_r if not k.startswith("clip_ratio")),
                        clip_flips_over_3=max(0.0, flips - 3.0))
            report("fused_policy_loss_large" + ("" if form == "default" else "+1launch"), f"N={N}", dtype, errs,
                   TOL[dtype])
            z.grad = None
            torch.cuda.empty_cache()
        SPLIT.clear()
        SPLIT.update(default)
        gl = torch.randn(N, generator=g, device=dev, dtype=torch.float64)
        ge = torch.randn(N, generator=g, device=dev, dtype=torch.float64)
        lp, en = token_logprobs(z, y, TEMP, return_entropy=True)
        (lp.view(N) * gl + en.view(N) * ge).sum().backward()
        report("token_logprobs_large", f"N={N}", dtype,
               dict(logp=rel(lp.detach().view(N), lp64), ent=rel(en.detach().view(N), en64),
                    dz_rows=rel(z.grad.view(N, V)[rows], grad_rows(gl, ge))), TOL[dtype])
        del z, logits, lp, en
        torch.cuda.empty_cache()


def check_fused_linear(dev, V=151936, D=1536, B=4, T=256):
    g = torch.Generator(device=dev).manual_seed(1)
    for name in ("sft", "grpo", "dapo", "luffy", "hpt", "gspo"):
        est = Estimator.preset(name)
        if est.agg.endswith("token-sum-norm"):
            est = Estimator.preset(name, agg_norm=float(T))
        h = torch.randn(B, T, D, generator=g, device=dev, dtype=torch.float64)
        w = torch.randn(V, D, generator=g, device=dev, dtype=torch.float64) * (2.0 / D ** 0.5)
        with torch.no_grad():
            logits = h @ w.t()
        _, targets, kw = batch(est, B, T, V, dev, g)
        if "old_logp" in kw:  # old log-probs of these logits, perturbed past the clip range
            lp = torch.log_softmax(logits / TEMP, -1).gather(-1, targets[..., None])[..., 0].float()
            kw["old_logp"] = lp + 0.5 * torch.randn(B, T, generator=g, device=dev)
        del logits
        for dtype in (torch.float32, torch.bfloat16):
            # the oracle sees the same rounded inputs as the kernel (else bf16 rounding of h, w moves tokens across
            # the clip boundary and the comparison measures the rounding, not the kernel)
            hr, wr = h.to(dtype).double().requires_grad_(), w.to(dtype).double().requires_grad_()
            loss_r, _ = fused_linear_policy_loss(hr, wr, targets, est, temperature=TEMP, impl="torch", **kw)
            loss_r.backward()
            # (chunked, exact, one_pass=False): the two-pass path (its backward kernel) for token-level presets too
            runs = [("triton", True, None), ("chunked", True, None), ("chunked", True, False)]
            if dtype == torch.bfloat16:
                runs += [("triton", False, None), ("chunked", False, None)]
            for impl, exact, one_pass in runs:
                if one_pass is False and est.sequence_level:
                    continue  # (sequence-level estimators always take the two-pass path: the run above)
                hx, wx = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
                loss, _ = fused_linear_policy_loss(hx, wx, targets, est, temperature=TEMP, impl=impl,
                                                   exact=exact, one_pass=one_pass, **kw)
                loss.backward()
                tol = TOL[dtype] if dtype == torch.bfloat16 else 1e-4  # fp32: 1e-4 for D-long fp32 dot products
                tag = impl + ("" if exact else ",skip") + (",2pass" if one_pass is False else "")
                report(f"fused_linear[{tag}]", name, dtype,
                       dict(loss=loss_err(loss, loss_r, kw), dh=rel(hx.grad, hr.grad), dw=rel(wx.grad, wr.grad)),
                       tol)
                del hx, wx
        del hr, wr, h, w
        torch.cuda.empty_cache()


def check_fused_linear_large(dev, V=151936, D=512, B=8, T=4096, min_elems=2 ** 31):
    """N x V > 2^31 (32k tokens x 151936 = 4.98e9 logits): every impl's fp32 and bf16 log-probs, entropies and
    gradients of L = sum_t c_t logp_t + e_t H_t against a float64 oracle built row block by row block (the loss is a
    sum over tokens, so dH is per block and dW the sum of the blocks' contributions)."""
    N = B * T
    assert N * V > min_elems
    g = torch.Generator(device=dev).manual_seed(3)
    h = torch.randn(N, D, generator=g, device=dev)
    w = torch.randn(V, D, generator=g, device=dev) * (2.0 / D ** 0.5)
    tgt = torch.randint(0, V, (N,), generator=g, device=dev)
    c = torch.randn(N, generator=g, device=dev)
    e = torch.randn(N, generator=g, device=dev) * 0.1
    for dtype in (torch.float32, torch.bfloat16):
        hq, wq = h.to(dtype), w.to(dtype)
        lp_r, en_r = torch.empty(N, dtype=torch.float64, device=dev), torch.empty(N, dtype=torch.float64, device=dev)
        dh_r, dw_r = torch.empty(N, D, dtype=torch.float64, device=dev), torch.zeros(V, D, dtype=torch.float64,
                                                                                       device=dev)
        w64 = wq.double()
        for i in range(0, N, 2048):  # float64 oracle, 2048 rows at a time
            hb = hq[i:i + 2048].double().requires_grad_()
            wb = w64.detach().requires_grad_()
            lp, en = fused_linear_logprobs(hb, wb, tgt[i:i + 2048], TEMP, return_entropy=True, impl="torch")
            (lp * c[i:i + 2048].double() + en * e[i:i + 2048].double()).sum().backward()
            lp_r[i:i + 2048], en_r[i:i + 2048], dh_r[i:i + 2048] = lp.detach(), en.detach(), hb.grad
            dw_r += wb.grad
            del hb, wb, lp, en
        torch.cuda.empty_cache()
        for impl in ("chunked", "triton"):
            hx, wx = hq.clone().requires_grad_(), wq.clone().requires_grad_()
            lp, en = fused_linear_logprobs(hx, wx, tgt, TEMP, return_entropy=True, impl=impl)
            (lp * c + en * e).sum().backward()
            tol = TOL[dtype] if dtype == torch.bfloat16 else 1e-4
            report(f"fused_linear_large[{impl}]", f"N={N}", dtype,
                   dict(logp=rel(lp.detach(), lp_r), ent=rel(en.detach(), en_r), dh=rel(hx.grad, dh_r),
                        dw=rel(wx.grad, dw_r)), tol)
            del hx, wx, lp, en
            torch.cuda.empty_cache()
        # the default training path (one pass, chunked): SFT loss = -mean logp, so dL/dlogp = -1/N per token
        hx, wx = hq.clone().requires_grad_(), wq.clone().requires_grad_()
        loss, _ = fused_linear_policy_loss(hx, wx, tgt, Estimator.preset("sft"), advantages=1.0,
                                           temperature=TEMP)
        loss.backward()
        loss_r = -lp_r.mean()
        # the oracle's gradients for c = -1/N, e = 0: rebuild from the blocks' formula is costly; compare the loss and
        # the direction of the gradient with a second oracle pass only on the first block's rows (dH is per row)
        hb = hq[:2048].double().requires_grad_()
        lpb = fused_linear_logprobs(hb, w64, tgt[:2048], TEMP, impl="torch")
        (-lpb.sum() / N).backward()
        report("fused_linear_large[1pass]", f"N={N}", dtype,
               dict(loss=abs(loss.item() - loss_r.item()) / abs(loss_r.item()), dh=rel(hx.grad[:2048], hb.grad)),
               TOL[dtype] if dtype == torch.bfloat16 else 1e-4)
        del hx, wx, hb, lpb, dh_r, dw_r, w64
        torch.cuda.empty_cache()


def main():
    import argparse  # noqa: PLC0415
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["all", "logits", "fused_linear"], default="all")
    ap.add_argument("--no-large", action="store_true", help="skip the N x V > 2^31 checks (logits and fused-linear, ~1 min each)")
    ap.add_argument("--smoke", action="store_true",
                    help="every check at tiny sizes on the CPU under TRITON_INTERPRET=1 (the script's logic, not the GPU)")
    a = ap.parse_args()
    import triton  # noqa: PLC0415
    if a.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("check_cuda.py --smoke runs the kernels under the interpreter: set TRITON_INTERPRET=1")
        dev = torch.device("cpu")
        print(f"# smoke test on the CPU (interpreter): torch {torch.__version__} triton {triton.__version__}")
        if a.part in ("all", "logits"):
            check_logits_ops(dev, V=1031, B=2, T=6, large=False)
            if not a.no_large:  # (the same code with a tiny "boundary": row 7 is the first past 7 rows)
                check_logits_large(dev, V=1031, B=2, T=8, rows_per_block=5, min_elems=0, first_past=7)
        if a.part in ("all", "fused_linear"):
            check_fused_linear(dev, V=1031, D=24, B=2, T=6)
            if not a.no_large:
                check_fused_linear_large(dev, V=1031, D=24, B=2, T=8, min_elems=0)
    else:
        if not torch.cuda.is_available():
            sys.exit("check_cuda.py needs a CUDA GPU (the test suite covers the CPU interpreter; --smoke: this "
                     "script's logic at tiny sizes)")
        torch.backends.cuda.matmul.allow_tf32 = False
        dev = torch.device("cuda")
        print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
        if a.part in ("all", "logits"):
            check_logits_ops(dev, large=not a.no_large)
        if a.part in ("all", "fused_linear"):
            check_fused_linear(dev)
            if not a.no_large:
                check_fused_linear_large(dev)
    print(f"# {len(failures)} failure(s)")
    for f in failures:
        print(f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
