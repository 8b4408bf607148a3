"""Benchmark of the logits-input loss (goals and measured results: benchmarks/RESULTS.md): GRPO loss fwd + bwd.

Methods, at B x T x V = 8 x 1024 x 151936 and 4 x 8192 x 151936 bf16 (8k and 32k tokens):
  fastupg-fused           fused_policy_loss, check="sync" (the default: one host sync for the data checks)
  fastupg-fused-deferred  fused_policy_loss, check="deferred" (data checks still computed, read later: no sync)
  fastupg-fused-inplace   the same with inplace_backward=True (the gradient overwrites the logits)
  fastupg-logprobs        token_logprobs + fastupg.policy_loss (the log-prob layer: forward and backward kernels)
  eager / torch.compile   fastupg.policy_loss on log_softmax(logits.float()).gather (PyTorch)
  liger                   Liger-Kernel's triton_grpo_loss (if importable; GRPO only, no metrics)
  copy                    a device-to-device copy of the logits: the floor for reading them once + writing once
Every fastupg row computes the same metrics (clip fractions, ratio mean, entropy, KL, token counts) in the kernels.
Time: triton.testing.do_bench median (ms), L2 flushed; peak = memory allocated beyond the inputs during one step
(the N x V gradient counts unless written in place); x liger = Liger's time / this time, same size, same run.

    python benchmarks/bench_logits.py --out DIR     # GPU: JSON (pytest-benchmark shape), table, PNG plots in DIR
    python benchmarks/bench_logits.py --tune        # also sweep the fused kernel's launch forms first (TUNE)
    python benchmarks/bench_logits.py --quick       # tiny sizes on the CPU (smoke test: times mean nothing)
    python benchmarks/plot_bench.py DIR/bench_logits.json --out DIR
The same benchmarks run under pytest-benchmark: `pytest benchmarks/ --benchmark-json out.json`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fastupg  # noqa: E402
from _bench_common import alias  # noqa: E402
from fastupg.estimator import Estimator  # noqa: E402
from fastupg.kernels import fused_policy_loss, token_logprobs  # noqa: E402
from fastupg.kernels import logits as K  # noqa: E402

SIZES = [(8, 1024, 151936), (4, 8192, 151936)]
QUICK_SIZES = [(2, 16, 1031), (2, 64, 1031)]
METHODS = ("copy", "liger", "fastupg-fused", "fastupg-fused-deferred", "fastupg-logprobs", "eager", "torch.compile",
           "fastupg-fused-inplace")  # (in-place last: it overwrites the shared logits buffer)
# (chunk, warps, one_launch, lag): the fused kernel's launch forms (SPLIT in fastupg/kernels/_logits_triton.py). The
# H100 sweep of 2026-11-25 timed the two-launch form of then at 1024 x 1 (2.84 ms at 8k tokens, the default) and
# 4096 x 4 (2.86), and the one-launch form of then (3.6-6.0 ms). Both forms changed on 2026-12-07 (the row part
# once per row; the one-launch form in ticket order, its chunk read again from L2 `lag` rows later): not yet
# measured. lag: with ~2-4k one-warp programs resident on an H100 (about 14-28 rows of 149 chunks), a lag of
# 32-64 rows rarely waits, and keeps 9-19 MB of logits between a chunk's two reads (L2: 50 MB).
TUNE = [(1024, 1, False, 0), (4096, 4, False, 0), (2048, 4, False, 0),
        (1024, 1, True, 32), (1024, 1, True, 64), (1024, 2, True, 32), (1024, 4, True, 16), (1024, 4, True, 32),
        (2048, 4, True, 32)]


class Problem:
    def __init__(self, B, T, V, dev, dtype=torch.bfloat16, seed=0):
        g = torch.Generator(device=dev).manual_seed(seed)  # generated on the device: 5e9 logits take minutes on CPU
        self.B, self.T, self.V, self.N = B, T, V, B * T
        self.logits = (torch.randn(B, T, V, generator=g, device=dev, dtype=torch.float32) * 2).to(dtype)
        self.y = torch.randint(0, V, (B, T), generator=g, device=dev)
        self.adv_seq = torch.randn(B, generator=g, device=dev)
        self.adv = self.adv_seq[:, None].expand(B, T).contiguous()  # GRPO: one advantage per sequence
        with torch.no_grad():
            lp = torch.log_softmax(self.logits.float(), -1).gather(-1, self.y[..., None])[..., 0] \
                if V * B * T < 2 ** 27 else token_logprobs(self.logits, self.y)
        self.old = lp + 0.1 * torch.randn(B, T, generator=g, device=dev)  # some tokens clipped on each side
        self.mask = torch.rand(B, T, generator=g, device=dev) > 0.05
        self.est = Estimator.preset("grpo")


def _eager_loss(p: Problem):
    def f(z, y, adv, old, mask):
        lp = torch.log_softmax(z.float(), -1).gather(-1, y[..., None])[..., 0]
        return fastupg.policy_loss(lp, p.est, advantages=adv, old_logp=old, mask=mask)[0]
    return f


def make_step(method: str, p: Problem, compiled=None):
    """A fwd+bwd step of `method` on p (None when not available here)."""
    cuda = p.logits.is_cuda
    triton_ok = cuda or os.environ.get("TRITON_INTERPRET") == "1"
    kw = dict(advantages=p.adv, old_logp=p.old, mask=p.mask)
    if method == "copy":  # the floor of a loss that reads the logits once and writes their gradient once
        if not cuda:
            return None
        dst = torch.empty_like(p.logits)
        return lambda: dst.copy_(p.logits)
    if method.startswith("fastupg-fused"):
        if not triton_ok and method != "fastupg-fused":
            return None
        check = "sync" if method == "fastupg-fused" else "deferred"
        inplace = method == "fastupg-fused-inplace"

        def step():
            z = alias(p.logits.detach().requires_grad_()) if inplace else p.logits.detach().requires_grad_()
            fused_policy_loss(z, p.y, p.est, check=check, inplace_backward=inplace, **kw)[0].backward()
        return step
    if method == "fastupg-logprobs":
        def step():
            z = p.logits.detach().requires_grad_()
            lp = token_logprobs(z, p.y)
            fastupg.policy_loss(lp, p.est, **kw)[0].backward()
        return step
    if method in ("eager", "torch.compile"):
        if method == "torch.compile" and (not cuda or compiled is None):
            return None
        f = compiled if method == "torch.compile" else _eager_loss(p)

        def step():
            z = p.logits.detach().requires_grad_()
            f(z, p.y, p.adv, p.old, p.mask).backward()
        return step
    if method == "liger":
        if not cuda:
            return None
        try:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss  # noqa: PLC0415
        except Exception:  # noqa: BLE001
            return None
        pad = torch.cat([p.logits, p.logits[:, -1:]], 1)  # Liger reads logits[:, :-1]: a (B, T+1, V) tensor
        maskf = p.mask

        def step():
            z = pad.detach().requires_grad_()
            out = triton_grpo_loss(z, p.old, None, p.y, p.adv_seq, maskf, temperature=1.0, beta=0.0, eps_low=0.2,
                                   eps_high=0.2, inplace=True)
            per_tok = out[0] if isinstance(out, (tuple, list)) else out
            ((per_tok * maskf).sum() / maskf.sum()).backward()
        return step
    raise ValueError(method)


def time_ms(fn, cuda: bool) -> float:
    if cuda:
        import triton.testing  # noqa: PLC0415
        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[1] * 1e3


def peak_mib(fn, cuda: bool):
    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def run_one(method: str, p: Problem, compiled=None) -> dict:
    cuda = p.logits.is_cuda
    row = dict(method=method, N=p.N, B=p.B, T=p.T, V=p.V, status="ok", total_ms=None, peak_extra_mib=None)
    step = make_step(method, p, compiled)
    if step is None:
        row["status"] = "not available here"
        return row
    try:
        step()
        if cuda:
            torch.cuda.synchronize()
        row["total_ms"] = time_ms(step, cuda)
        row["peak_extra_mib"] = peak_mib(step, cuda)
    except Exception as e:  # noqa: BLE001
        row["status"] = f"{type(e).__name__}: {str(e)[:160]}"
    if cuda:
        torch.cuda.empty_cache()
    return row


def tune(p: Problem, configs=TUNE) -> dict:
    """Sweep the fused kernel's launch forms (TUNE) with check='deferred'; set K.SPLIT to the fastest and return it."""
    rows = []
    default = dict(K.SPLIT)
    ref = _loss_and_grad(p)  # the default configuration's (checked by check_cuda.py): every other must agree
    for chunk, warps, one, lag in configs:
        K.SPLIT.update(chunk=chunk, warps=warps, one_launch=one, lag=lag or default["lag"])
        loss, grad = _loss_and_grad(p)
        err = max(abs(float(loss) - float(ref[0])) / max(abs(float(ref[0])), 1e-12),
                  float((grad.float() - ref[1].float()).norm() / ref[1].float().norm()))
        del grad
        r = run_one("fastupg-fused-deferred", p) if err <= 2e-2 else dict(total_ms=None, status=f"BAD {err:.1e}")
        print(f"# tune chunk={chunk:6d} warps={warps:2d} one_launch={one!s:5} lag={lag:3d}: "
              f"{r['total_ms'] if r['total_ms'] else r['status']}  (vs default config: {err:.1e})", flush=True)
        if r["total_ms"]:
            rows.append((r["total_ms"], chunk, warps, one, lag or default["lag"]))
    if not rows:
        K.SPLIT.update(default)
        print("# tune: no configuration agreed with the default one; keeping it", flush=True)
        return K.SPLIT
    best = min(rows)
    K.SPLIT.update(chunk=best[1], warps=best[2], one_launch=best[3], lag=best[4])
    print(f"# tune best: {K.SPLIT} ({best[0]:.3f} ms)", flush=True)
    return K.SPLIT


def _loss_and_grad(p: Problem):
    """fused_policy_loss's loss and logits gradient on p under the current launch configuration (K.SPLIT)."""
    z = p.logits.detach().requires_grad_()
    loss = fused_policy_loss(z, p.y, p.est, advantages=p.adv, old_logp=p.old, mask=p.mask)[0]
    loss.backward()
    return loss.detach(), z.grad


def profile_step(method: str, p: Problem) -> str:
    """One step under torch.profiler: kernel launches and summed GPU kernel time (the rest is host work/gaps)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415
    step = make_step(method, p)
    if step is None:
        return f"{method}: not available"
    step()
    torch.cuda.synchronize()
    walls, hosts = [], []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()  # host time: until the call returns (all launches queued, or the sync of check="sync" done)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        hosts.append((t1 - t0) * 1e3)
        walls.append((time.perf_counter() - t0) * 1e3)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    ev = [x for x in prof.key_averages() if x.device_type == torch.autograd.DeviceType.CUDA]
    kern = sum(x.self_device_time_total for x in ev) / 1e3
    top = sorted(ev, key=lambda x: -x.self_device_time_total)[:4]
    return (f"{method}: wall {sorted(walls)[2]:.3f} ms/step (host returns after {sorted(hosts)[2]:.3f} ms), "
            f"{sum(x.count for x in ev)} GPU kernels, {kern:.3f} ms GPU time; top: " +
            "; ".join(f"{x.key[:40]} {x.self_device_time_total / 1e3:.3f} ms x{x.count}" for x in top))


def versions() -> dict:
    import platform  # noqa: PLC0415

    import triton  # noqa: PLC0415
    info = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor()})",
                torch=torch.__version__, triton=triton.__version__, python=platform.python_version())
    try:
        import liger_kernel  # noqa: F401, PLC0415
        from importlib.metadata import version  # noqa: PLC0415
        info["liger_kernel"] = version("liger-kernel")
    except Exception:  # noqa: BLE001
        info["liger_kernel"] = "not installed"
    return info


def to_json(rows: list[dict], info: dict) -> dict:
    """The pytest-benchmark JSON shape (benchmarks[] with stats.median in seconds and extra_info), so plot_bench.py
    and comparisons read script and pytest runs alike."""
    out = []
    for r in rows:
        if r["total_ms"] is None:
            continue
        out.append(dict(name=f"logits[{r['method']}-N{r['N']}]", group="logits GRPO loss fwd+bwd (V=%d)" % r["V"],
                        params=dict(method=r["method"], N=r["N"]),
                        stats=dict(median=r["total_ms"] / 1e3, rounds=1),
                        extra_info={k: v for k, v in r.items() if k != "status"}))
    return dict(machine_info=info, datetime=datetime.datetime.now(datetime.timezone.utc).isoformat(), benchmarks=out)


def table(rows: list[dict]) -> str:
    lines = [f"{'B x T x V':>18} {'method':>24} {'ms':>9} {'peak MiB':>9} {'x liger':>8}"]
    liger = {r["N"]: r["total_ms"] for r in rows if r["method"] == "liger" and r["total_ms"]}
    for r in rows:
        size = f"{r['B']}x{r['T']}x{r['V']}"
        if r["total_ms"] is None:
            lines.append(f"{size:>18} {r['method']:>24}   {r['status']}")
            continue
        mem = f"{r['peak_extra_mib']:9.1f}" if r["peak_extra_mib"] is not None else f"{'-':>9}"
        x = f"{liger[r['N']] / r['total_ms']:8.2f}" if r["N"] in liger else f"{'-':>8}"
        lines.append(f"{size:>18} {r['method']:>24} {r['total_ms']:9.3f} {mem} {x}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="See the module docstring for the methods and columns.")
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (smoke test; times mean nothing)")
    ap.add_argument("--out", metavar="DIR", help="write bench_logits.json (pytest-benchmark shape), .txt, PNG plots")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--sizes", nargs="+", metavar="BxT", help="sizes as BxT (V = 151936), e.g. 8x1024 4x8192")
    ap.add_argument("--tune", action="store_true", help="sweep the fused kernel's (chunk, warps) at the first size")
    ap.add_argument("--profile", action="store_true", help="kernel launches / GPU time of one step per method")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.quick
    if not cuda and not a.quick:
        print("bench_logits.py: no CUDA GPU; use --quick for the CPU smoke test", file=sys.stderr)
        sys.exit(2)
    dev = torch.device("cuda" if cuda else "cpu")
    if a.sizes:
        try:
            sizes = [(int(s.split("x")[0]), int(s.split("x")[1]), 151936 if cuda else 1031) for s in a.sizes]
        except (ValueError, IndexError):
            print(f"bench_logits.py: --sizes takes BxT values such as 8x1024, got {a.sizes}", file=sys.stderr)
            sys.exit(2)
    else:
        sizes = SIZES if cuda else QUICK_SIZES
    info = versions()
    print(f"# {info}", flush=True)
    rows = []
    for i, (B, T, V) in enumerate(sizes):
        p = Problem(B, T, V, dev)
        if a.tune and i == 0:  # (on the CPU: every form runs and is compared with the default; times meaningless)
            tune(p)
        compiled = None
        if cuda and "torch.compile" in a.methods and not a.no_compile:
            compiled = torch.compile(_eager_loss(p))
        for m in a.methods:
            r = run_one(m, p, compiled)
            rows.append(r)
            print(f"# {m} {B}x{T}x{V}: {r['total_ms']} ms, {r['peak_extra_mib']} MiB, {r['status']}", flush=True)
        if a.profile and cuda:
            for m in ("fastupg-fused", "fastupg-fused-deferred", "liger"):
                print("# profile " + profile_step(m, p), flush=True)
        del p
        if cuda:
            torch.cuda.empty_cache()
    info["fused_kernel_config"] = dict(K.SPLIT)
    text = table(rows)
    print(f"device: {info['device']}  ({'times meaningless: CPU smoke test' if not cuda else 'do_bench median'})")
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        doc = to_json(rows, info)
        with open(os.path.join(a.out, "bench_logits.json"), "w") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.join(a.out, "bench_logits.txt"), "w") as f:
            f.write(f"# {info}\n{text}\n")
        from plot_bench import plot  # noqa: PLC0415
        for path in plot(os.path.join(a.out, "bench_logits.json"), a.out):
            print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
