"""fused_policy_loss vs a float64 autograd reference (log_softmax in float64 + fastupg.policy_loss)."""
import dataclasses

import pytest
import torch

from fastupg.estimator import PRESETS, Estimator
from fastupg.kernels import fused_policy_loss, loss_and_grad_rows
from fastupg.kernels.torch_reference import fused_policy_loss_ref

SMALL = 256  # V=1000: 4 blocks with a masked tail


def _relerr(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _batch(name, B=3, T=8, V=1000, dtype=torch.float32, seed=0, **over):
    g = torch.Generator().manual_seed(seed)
    est = Estimator.preset(name, **over)
    logits = (torch.randn(B, T, V, generator=g) * 2.0).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, targets[..., None])[..., 0].float()
    kw = dict(advantages=torch.randn(B, T, generator=g))
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[0, 0] = True
    kw["mask"] = mask
    if est.online is not None and est.online.needs_old:
        # perturb by more than the clip range: clipping active on both sides
        kw["old_logp"] = lp + torch.randn(B, T, generator=g) * 0.5
    if est.online is not None and est.offline is not None:
        off = torch.zeros(B, T, dtype=torch.bool)
        off[-1] = True
        kw["offline"] = off
        if "old_logp" in kw:
            kw["old_logp"] = torch.where(off, torch.full_like(lp, -1e4), kw["old_logp"])  # garbage on demo rows
    if est.offline is not None and est.online is None:
        kw["advantages"] = torch.ones(B, T)
    kw["weight"] = torch.rand(B, T, generator=g) + 0.5
    if est.kl_coef != 0:
        kw["ref_logp"] = lp + torch.randn(B, T, generator=g) * 0.3
    return est, logits, targets, kw


def _check(est, logits, targets, kw, tol, agg=None, inplace=False, block_v=SMALL):
    ref_in = logits.double().requires_grad_()
    loss_r, met_r = fused_policy_loss_ref(ref_in, targets, est, temperature=0.7, agg=agg, **kw)
    loss_r.backward()
    z = logits.clone().requires_grad_()
    src = z
    if inplace:
        z = logits.clone().requires_grad_()
        src = z * 1  # non-leaf buffer the kernel may overwrite
    loss, met = fused_policy_loss(src, targets, est, temperature=0.7, agg=agg, inplace_backward=inplace,
                                  block_v=block_v, **kw)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert bool((z.grad[~kw["mask"]] == 0).all())  # masked rows: zero gradient
    # the loss is a sum of signed terms that may cancel: measure its error against the size of the terms
    m = kw["mask"].double()
    term = (kw["advantages"].abs().double() * m).sum() / m.sum()
    assert abs(loss.item() - loss_r.item()) <= tol * max(abs(loss_r.item()), term.item())
    assert _relerr(z.grad, ref_in.grad) < tol
    assert set(met) == set(met_r)
    for k in met:
        assert abs(met[k].item() - met_r[k].item()) <= tol * max(1.0, abs(met_r[k].item())), k
    return met


TOKEN_PRESETS = [n for n, e in PRESETS.items() if not e.sequence_level]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_fp32(name):
    """Every preset with an entropy bonus and a KL term on top (both branches of the hybrid ones)."""
    est, logits, targets, kw = _batch(name, entropy_coef=0.01, kl_coef=0.05)
    if est.sequence_level:
        # GSPO's sequence ratios must straddle its tiny clip range (3e-4 / 4e-4): small per-token perturbations
        # (here one sequence inside the range, one above, one below)
        lp = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, targets[..., None])[..., 0]
        kw["old_logp"] = (lp + torch.randn(lp.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
                          * 2e-3).float()
    met = _check(est, logits, targets, kw, 1e-5)
    e = PRESETS[name]
    if e.online is not None and e.online.mask == "clip" and e.online.ref == "old":
        assert met["clip_ratio/low"] > 0 and met["clip_ratio/high"] > 0
    if est.sequence_level:
        assert 0 < met["clip_ratio/low"] + met["clip_ratio/high"] < 1  # some sequences clipped, some not


@pytest.mark.timeout(600)  # (a wait that never ends would spin forever under the interpreter)
@pytest.mark.parametrize("name", TOKEN_PRESETS)
@pytest.mark.parametrize("lag", [1, 3])
def test_one_launch_form(name, lag, monkeypatch):
    """SPLIT["one_launch"]: stats, row and gradient parts in ONE launch, in ticket order, the gradient of a chunk
    `lag` rows behind its stats (the form that reads the logits from HBM once on a GPU): same results as float64,
    in place too, with masked rows, an entropy bonus and a KL term, and it is the form that ran. (The interpreter
    runs programs in ticket order, so no wait spins here; check_cuda.py runs it compiled.)"""
    from fastupg.kernels import _logits_triton as KT
    monkeypatch.setitem(KT.SPLIT, "one_launch", True)
    monkeypatch.setitem(KT.SPLIT, "lag", lag)
    est, logits, targets, kw = _batch(name, entropy_coef=0.01, kl_coef=0.05, seed=4)
    KT.LAST_LAUNCH.clear()
    _check(est, logits, targets, kw, 1e-5)
    assert KT.LAST_LAUNCH["form"] == "one"
    _check(est, logits, targets, kw, 1e-5, inplace=True)


@pytest.mark.parametrize("name", ["grpo", "hpt", "cispo"])
def test_one_launch_form_without_grad(name, monkeypatch):
    """The one-launch form with no gradient (lag 0, grid N x K: stats and the row part only): loss and metrics as
    float64, and it is the form that ran."""
    from fastupg.kernels import _logits_triton as KT
    monkeypatch.setitem(KT.SPLIT, "one_launch", True)
    est, logits, targets, kw = _batch(name, entropy_coef=0.01, kl_coef=0.05, seed=4)
    loss_r, met_r = fused_policy_loss_ref(logits.double(), targets, est, temperature=0.7, **kw)
    KT.LAST_LAUNCH.clear()
    with torch.no_grad():
        loss, met = fused_policy_loss(logits, targets, est, temperature=0.7, block_v=SMALL, **kw)
    assert KT.LAST_LAUNCH["form"] == "one"
    m = kw["mask"].double()
    term = (kw["advantages"].abs().double() * m).sum() / m.sum()
    assert abs(loss.item() - loss_r.item()) <= 1e-5 * max(abs(loss_r.item()), term.item())
    for k in met:
        assert abs(met[k].item() - met_r[k].item()) <= 1e-5 * max(1.0, abs(met_r[k].item())), k


@pytest.mark.parametrize("one_launch", [False, True])
def test_row_outputs_every_row_written(one_launch, monkeypatch):
    """Every row's outputs are written, masked rows' too (zeros, and their data-check flags), whatever was in the
    buffers before: filled with nan here. One-launch form: RowInputs zeroes its counters once per call, so
    launching rows a second time (their counters already past K: their row part would never run again) is
    refused, not silently stale."""
    from fastupg.kernels import _logits_triton as KT
    monkeypatch.setitem(KT.SPLIT, "one_launch", one_launch)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 300, generator=g)
    tgt = torch.randint(0, 300, (6,), generator=g)
    mask = torch.tensor([True, False, True, True, False, True])
    x = dict(scale=torch.full((6,), 1 / 6), mask=mask, adv=torch.randn(6, generator=g), old=None)
    rows = KT.RowInputs(Estimator.preset("reinforce"), x, tgt, z.device)
    for out in (rows.ell, rows.logp, rows.ent, rows.ratio, rows.kl):
        out.fill_(float("nan"))
    rows.flags.fill_(-1)
    grad = torch.full_like(z, float("nan"))
    rows.launch(z[:3], 0, 3, grad[:3], 1.0, block_v=128)
    rows.launch(z[3:], 3, 6, grad[3:], 1.0, block_v=128)
    lp = torch.log_softmax(z.double(), -1).gather(1, tgt[:, None])[:, 0]
    assert torch.allclose(rows.logp[mask].double(), lp[mask], atol=1e-5)
    for out in (rows.ell, rows.logp, rows.ent, rows.ratio, rows.kl):
        assert bool((out[~mask] == 0).all()), out
    assert bool((rows.flags == 0).all()) and bool((grad[~mask] == 0).all()) and bool(torch.isfinite(grad).all())
    if one_launch:
        with pytest.raises(RuntimeError, match="launched before"):
            rows.launch(z[3:], 3, 6, grad[3:], 1.0, block_v=128)


def test_one_launch_lag_must_be_positive(monkeypatch):
    from fastupg.kernels import _logits_triton as KT
    monkeypatch.setitem(KT.SPLIT, "one_launch", True)
    monkeypatch.setitem(KT.SPLIT, "lag", 0)
    est, logits, targets, kw = _batch("grpo")
    with pytest.raises(ValueError, match="lag"):
        fused_policy_loss(logits.requires_grad_(), targets, est, temperature=0.7, block_v=SMALL, **kw)


@pytest.mark.parametrize("name", ["grpo", "luffy", "hpt", "cispo", "sft"])
def test_bf16(name):
    est, logits, targets, kw = _batch(name, dtype=torch.bfloat16, seed=1, entropy_coef=0.01)
    _check(est, logits, targets, kw, 2e-2)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm", "token-sum-norm", "token-sum"])
@pytest.mark.parametrize("layout", ["batch", "flat"])
def test_aggregation_modes(agg, layout):
    """batch: (B, T, V) logits, one sequence per row (the prep kernel counts the sequences); flat: (N, V) logits with
    seq_ids= whose sequences cross the rows (the weights come from fastupg.estimator) and Estimator.agg_norm."""
    est, logits, targets, kw = _batch("srft", seed=2, **({"agg_norm": 50.0} if layout == "flat" else {}))
    if layout == "flat":
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        kw = {k: v.reshape(-1) for k, v in kw.items()}
        kw["seq_ids"] = torch.arange(targets.numel()) // 5
    _check(est, logits, targets, kw, 1e-5, agg=agg)


def test_gpt2_vocab_default_block():
    """An odd vocabulary (GPT-2's 50257) at the default vocabulary block (a masked tail in the last chunk)."""
    est, logits, targets, kw = _batch("hpt", B=3, T=4, V=50257, seed=5)
    _check(est, logits, targets, kw, 1e-5, block_v=None)


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_entropy_kl_dual_clip(kl):
    est, logits, targets, kw = _batch("grpo", seed=3, entropy_coef=0.01, kl_coef=0.05, kl_estimator=kl,
                                      dual_clip=1.5)
    kw["advantages"] = -kw["advantages"].abs() - 0.1  # A < 0 everywhere: dual clip can bite
    kw["old_logp"] = kw["old_logp"] - 2.0  # r >> 1: loss exceeds the cap
    met = _check(est, logits, targets, kw, 1e-5)
    assert met["clip_ratio/dual"] > 0


def test_hpt_official_entropy_bonus():
    est, logits, targets, kw = _batch("hpt", seed=4, entropy_coef=0.001, agg="seq-mean-token-sum-norm", agg_norm=64.0)
    _check(est, logits, targets, kw, 1e-5)


def test_inplace_backward():
    est, logits, targets, kw = _batch("grpo", seed=5)
    _check(est, logits, targets, kw, 1e-5, inplace=True)


def test_all_masked_zero_loss_zero_grad():
    est, logits, targets, kw = _batch("grpo", seed=6)
    kw["mask"] = torch.zeros_like(kw["mask"])
    z = logits.clone().requires_grad_()
    loss, _ = fused_policy_loss(z, targets, est, block_v=SMALL, **kw)
    loss.backward()
    assert loss.item() == 0.0 and bool((z.grad == 0).all())


def test_grad_output_scaling_and_rows_api():
    """An upstream gradient g != 1 scales the saved gradient; loss_and_grad_rows (the building block fused_linear
    uses) gives the float64 reference's loss and gradient on its own."""
    est, logits, targets, kw = _batch("dapo", seed=7)
    zr = logits.double().requires_grad_()
    loss_r, _ = fused_policy_loss_ref(zr, targets, est, **kw)
    (3.0 * loss_r).backward()
    z = logits.clone().requires_grad_()
    loss, _ = fused_policy_loss(z, targets, est, block_v=SMALL, **kw)
    (3.0 * loss).backward()
    assert _relerr(z.grad, zr.grad) < 1e-5
    from fastupg.estimator import aggregation_weights, prepare_inputs
    x = prepare_inputs(targets.shape, est, **kw)
    x["scale"] = (aggregation_weights(est, x["mask"], x["offline"], x["seq"], None, x["padded_len"])
                  * x["weight"].double()).float()
    ell, logp, ent, grad, _ = loss_and_grad_rows(logits.reshape(-1, 1000), targets.reshape(-1), est, x, 1.0,
                                                 block_v=SMALL)
    assert abs((x["scale"].double() * ell.double()).sum().item() - loss_r.item()) < 1e-5 * abs(loss_r.item())
    assert _relerr(3.0 * grad, zr.grad.reshape(-1, 1000)) < 1e-5


def test_bad_inputs():
    est, logits, targets, kw = _batch("grpo", seed=8)
    with pytest.raises(ValueError, match="targets"):
        fused_policy_loss(logits, targets + 1000, est, **kw)
    with pytest.raises(TypeError, match="targets"):
        fused_policy_loss(logits, targets.float(), est, **kw)
    with pytest.raises(ValueError, match="targets"):
        fused_policy_loss(logits, targets[:, :-1], est, **kw)
    with pytest.raises(ValueError, match="old_logp"):
        fused_policy_loss(logits, targets, est, **{**kw, "old_logp": None})
    with pytest.raises(ValueError, match="advantages has shape"):
        fused_policy_loss(logits, targets, est, **{**kw, "advantages": kw["advantages"][:, :3]})
    bad = dict(kw)
    bad["advantages"] = kw["advantages"].clone()
    bad["advantages"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="advantages"):
        fused_policy_loss(logits, targets, est, **bad)
    z = logits.clone()
    z[0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fused_policy_loss(z, targets, est, block_v=SMALL, **kw)


# -- issue 15 items 1 and 6, issue 13 item 1: each of these fails on the code before them ----------------------------
def _plain_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the plain-PyTorch path


def test_preset_name_or_type_error():
    est, logits, targets, kw = _batch("grpo", seed=20, B=2, T=4, V=300)
    a, _ = fused_policy_loss(logits, targets, "grpo", block_v=128, **kw)
    b, _ = fused_policy_loss(logits, targets, est, block_v=128, **kw)
    assert a.item() == b.item()
    with pytest.raises(TypeError, match="estimator"):
        fused_policy_loss(logits, targets, 3, **kw)


@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_advantage_one_branch_uses_one_and_advantages_optional(path, monkeypatch):
    """SFT tokens (advantage component 'one') use A = 1 whatever advantages= holds; sft needs no advantages=."""
    if path == "cpu":
        _plain_cpu(monkeypatch)
    est, logits, targets, kw = _batch("hpt", seed=21, B=3, T=4, V=300)
    kw["advantages"] = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))  # random on SFT rows too
    from fastupg.estimator import policy_loss
    lp = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, targets[..., None])[..., 0]
    a_eff = torch.where(kw["offline"], torch.ones_like(kw["advantages"]), kw["advantages"]).double()
    want, _ = policy_loss(lp, est, **{**kw, "advantages": a_eff})
    got, _ = fused_policy_loss(logits, targets, est, temperature=0.7, block_v=128, **kw)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    sft = Estimator.preset("sft")
    m = kw["mask"]
    got_sft, _ = fused_policy_loss(logits, targets, sft, mask=m, temperature=0.7, block_v=128)
    want_sft, _ = policy_loss(lp, sft, advantages=torch.ones(3, 4, dtype=torch.float64), mask=m)
    assert abs(got_sft.item() - want_sft.item()) <= 1e-5 * abs(want_sft.item())
    with pytest.raises(ValueError, match="advantages= is required"):
        fused_policy_loss(logits, targets, est, **{**kw, "advantages": None})


@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_fractional_mask_refused(path, monkeypatch):
    if path == "cpu":
        _plain_cpu(monkeypatch)
    est, logits, targets, kw = _batch("grpo", seed=22, B=2, T=4, V=300)
    with pytest.raises(ValueError, match="mask must hold 0/1"):
        fused_policy_loss(logits, targets, est, block_v=128, **{**kw, "mask": torch.full((2, 4), 0.5)})
    ok, _ = fused_policy_loss(logits, targets, est, block_v=128, **{**kw, "mask": kw["mask"].float()})
    ref, _ = fused_policy_loss(logits, targets, est, block_v=128, **kw)
    assert ok.item() == pytest.approx(ref.item(), rel=1e-6)


def test_nan_logits_in_masked_row_same_on_cpu_and_triton(monkeypatch):
    est, logits, targets, kw = _batch("grpo", seed=23, B=2, T=4, V=300)
    kw["mask"][1, 2] = False
    logits[1, 2] = float("nan")
    out = {}
    for path in ("triton", "cpu"):
        monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "triton" else "0")
        z = logits.clone().requires_grad_()
        loss, _ = fused_policy_loss(z, targets, est, block_v=128, **kw)
        loss.backward()
        assert torch.isfinite(loss) and bool(torch.isfinite(z.grad).all()) and bool((z.grad[1, 2] == 0).all())
        out[path] = (loss.item(), z.grad)
    assert out["triton"][0] == pytest.approx(out["cpu"][0], rel=1e-5)
    assert _relerr(out["triton"][1], out["cpu"][1]) < 1e-5
    kw["mask"][1, 2] = True  # a row that counts: both raise
    for path in ("triton", "cpu"):
        monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "triton" else "0")
        with pytest.raises(ValueError, match="non-finite"):
            fused_policy_loss(logits, targets, est, block_v=128, **kw)


def test_second_backward_with_retain_graph_is_right():
    """The saved gradient is not left scaled: backward(retain_graph=True) twice, with g = 3 then g = 0.5."""
    est, logits, targets, kw = _batch("dapo", seed=24, B=2, T=4, V=300)
    zr = logits.double().requires_grad_()
    loss_r, _ = fused_policy_loss_ref(zr, targets, est, **kw)
    (g_ref,) = torch.autograd.grad(loss_r, zr)
    z = logits.clone().requires_grad_()
    loss, _ = fused_policy_loss(z, targets, est, block_v=128, **kw)
    (3.0 * loss).backward(retain_graph=True)
    assert _relerr(z.grad, 3.0 * g_ref) < 1e-5
    z.grad = None
    (3.0 * loss).backward(retain_graph=True)
    assert _relerr(z.grad, 3.0 * g_ref) < 1e-5  # (the old code gave 9 x)
    z.grad = None
    (0.5 * loss).backward()
    assert _relerr(z.grad, 0.5 * g_ref) < 1e-5


@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_inplace_backward_is_visible_to_autograd(path, monkeypatch):
    if path == "cpu":
        _plain_cpu(monkeypatch)  # the flag is honoured there too (it was ignored)
    from fastupg.kernels import token_logprobs
    est, logits, targets, kw = _batch("grpo", seed=25, B=2, T=4, V=300)
    zr = logits.double().requires_grad_()
    loss_r, _ = fused_policy_loss_ref(zr, targets, est, **kw)
    (g_ref,) = torch.autograd.grad(loss_r, zr)

    # the README pattern: the logits are reused after the in-place call -> a clear error, not a wrong number
    leaf = logits.clone().requires_grad_()
    z = leaf * 1.0
    loss, _ = fused_policy_loss(z, targets, est, block_v=128, inplace_backward=True, **kw)
    assert _relerr(z.detach(), g_ref) < 1e-5  # the buffer now holds the gradient ...
    with pytest.raises(ValueError, match="overwritten"):
        token_logprobs(z, targets)  # ... and fastupg refuses to read it as logits
    loss.backward()
    assert _relerr(leaf.grad, g_ref) < 1e-5

    # an earlier use that autograd saved: its backward would read the gradient -> autograd's own error
    leaf = logits.clone().requires_grad_()
    z = leaf * 1.0
    aux = (z ** 2).mean()
    loss, _ = fused_policy_loss(z, targets, est, block_v=128, inplace_backward=True, **kw)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + aux).backward()

    # a later differentiable use of the overwritten logits -> error at backward
    leaf = logits.clone().requires_grad_()
    z = leaf * 1.0
    loss, _ = fused_policy_loss(z, targets, est, block_v=128, inplace_backward=True, **kw)
    with pytest.raises(RuntimeError, match="used after"):
        (loss + (z ** 2).mean()).backward()

    # a leaf that requires grad: refused
    with pytest.raises(ValueError, match="leaf"):
        fused_policy_loss(logits.clone().requires_grad_(), targets, est, inplace_backward=True, **kw)


def test_deferred_checks_raise_later_without_a_sync():
    from fastupg.kernels import raise_deferred_checks
    est, logits, targets, kw = _batch("grpo", seed=26, B=2, T=4, V=300)
    bad = targets.clone()
    bad[0, 1] = 300
    fused_policy_loss(logits, bad, est, check="deferred", block_v=128, **kw)  # no error yet: nothing read back
    with pytest.raises(ValueError, match="targets must lie in"):
        raise_deferred_checks()
    fused_policy_loss(logits, bad, est, check="off", block_v=128, **kw)
    raise_deferred_checks()  # "off": nothing queued
    with pytest.raises(ValueError, match="check must be one of"):
        fused_policy_loss(logits, targets, est, check="later", **kw)


def test_fused_kernel_compiles_for_sm90(compile_for_gpu):
    """The interpreter accepts kernels the GPU compiler refuses (the one-launch form's atomics and waits among
    them): compile every launch of the fused kernel, both forms, for sm_90."""
    r = compile_for_gpu("compile_logits.py")
    row = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("1024 x")]
    assert len(row) == 1 and row[0].count("(") == 4, r.stdout  # registers (programs/SM) of the 4 launches
