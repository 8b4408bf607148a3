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


def _check(est, logits, targets, kw, tol, agg=None, inplace=False):
    ref_in = logits.double().requires_grad_()
    loss_r, met_r = fused_policy_loss_ref(ref_in, targets, est, temperature=0.7, agg=agg, **kw)
    loss_r.backward()
    z = logits.clone().requires_grad_()
    src = z
    if inplace:
        z = logits.clone().requires_grad_()
        src = z * 1  # non-leaf buffer the kernel may overwrite
    loss, met = fused_policy_loss(src, targets, est, temperature=0.7, agg=agg, inplace_backward=inplace,
                                  block_v=SMALL, **kw)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
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
    est, logits, targets, kw = _batch(name)
    met = _check(est, logits, targets, kw, 1e-5)
    e = PRESETS[name]
    if e.online is not None and e.online.mask == "clip" and e.online.ref == "old":
        assert met["clip_ratio/low"] > 0 and met["clip_ratio/high"] > 0


@pytest.mark.parametrize("name", ["grpo", "luffy", "hpt"])
def test_bf16(name):
    est, logits, targets, kw = _batch(name, dtype=torch.bfloat16, seed=1)
    _check(est, logits, targets, kw, 2e-2)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm", "token-sum"])
def test_aggregation_modes(agg):
    est, logits, targets, kw = _batch("srft", seed=2)
    _check(est, logits, targets, kw, 1e-5, agg=agg)


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
    bad = dict(kw)
    bad["advantages"] = kw["advantages"].clone()
    bad["advantages"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="advantages"):
        fused_policy_loss(logits, targets, est, **bad)
    z = logits.clone()
    z[0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fused_policy_loss(z, targets, est, block_v=SMALL, **kw)
