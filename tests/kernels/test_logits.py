"""Logits kernels (token_logprobs, fused_policy_loss) under TRITON_INTERPRET=1 against a float64 autograd reference."""
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run on the CPU interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

from fastupg import PRESETS, Estimator, policy_loss  # noqa: E402
from fastupg.kernels.logits import fused_policy_loss, token_logprobs  # noqa: E402

T = 0.7


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def make(N=24, V=1000, seed=0, dtype=torch.float32, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, V, generator=g) * 3).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    with torch.no_grad():
        l0 = torch.log_softmax(z.double() / T, -1).gather(-1, t[:, None])[:, 0]
    A = torch.randn(N, generator=g)
    old = (l0 + torch.randn(N, generator=g, dtype=torch.float64) * spread).float()  # ratios beyond the clip range
    mask = torch.rand(N, generator=g) > 0.25
    # whatever the seed, one token clipped on each side: A > 0 with r = e, A < 0 with r = 1/e
    A[0], old[0], A[1], old[1] = 1.0, float(l0[0]) - 1.0, -1.0, float(l0[1]) + 1.0
    mask[:2] = True
    ref = (l0 + torch.randn(N, generator=g, dtype=torch.float64) * 0.3).float()
    return z, t, A, old, mask, ref


def reference(z, t, est, **kw):
    zd = z.detach().double().requires_grad_()
    logq = torch.log_softmax(zd / T, -1)
    lp = logq.gather(-1, t[..., None])[..., 0]
    ent = -(logq.exp() * logq).sum(-1)
    dkw = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    # (a branch whose advantage component is 'one' (SFT) uses A = 1 on its tokens: policy_loss applies it itself)
    loss, m = policy_loss(lp, est, entropy=ent, **dkw)
    loss.backward()
    return loss.detach(), zd.grad, m


def run(z, t, est, inplace=False, **kw):
    zz = z.clone().requires_grad_() if not inplace else z.clone()
    if inplace:
        # inplace_backward writes the gradient into the logits buffer: feed a non-leaf so autograd allows it
        leaf = zz.requires_grad_()
        zz = leaf * 1.0
    loss, m = fused_policy_loss(zz, t, est, temperature=T, block_v=256, inplace_backward=inplace, **kw)
    loss.backward()
    return loss.detach(), (leaf.grad if inplace else zz.grad), m


def kwargs_for(est, N, A, old, mask, ref, seq=None):
    off = None
    if est.online is not None and est.offline is not None:
        off = torch.arange(N) % 3 == 2
    kw = dict(advantages=A, old_logp=old, mask=mask, offline=off, ref_logp=ref if est.kl_coef else None)
    if seq is not None:
        kw["seq_ids"] = seq
    return kw


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_fp32(name):
    z, t, A, old, mask, ref = make(seed=zlib.crc32(name.encode()) % 1000)  # stable across processes
    est = Estimator.preset(name, entropy_coef=0.01, kl_coef=0.05, agg_norm=40.0)
    seq = torch.arange(24) // 6
    if name == "gspo":
        old = old.clone()
        # sequence ratios must straddle GSPO's tiny clip range: small per-token perturbations
        z2, t2, _, _, _, _ = make(seed=1)
        l0 = torch.log_softmax(z.double() / T, -1).gather(-1, t[:, None])[:, 0]
        old = (l0 + torch.randn(24, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1e-3).float()
    kw = kwargs_for(est, 24, A, old, mask, ref, seq)
    loss, grad, m = run(z, t, est, **kw)
    rl, rg, rm = reference(z, t, est, **kw)
    assert abs(float(loss) - float(rl)) <= 1e-5 * abs(float(rl)) + 1e-7
    assert rel(grad, rg) < 1e-5
    for k in ("clip_ratio/low", "clip_ratio/high", "clip_ratio/dual", "ratio/mean", "entropy", "kl"):
        assert float(m[k]) == pytest.approx(float(rm[k]), rel=1e-4, abs=1e-6), k
    if est.online is not None and est.online.mask == "clip" and name != "gspo":
        assert float(m["clip_ratio/low"]) > 0 and float(m["clip_ratio/high"]) > 0  # both sides active


@pytest.mark.parametrize("name", ["grpo", "hpt", "luffy", "cispo", "sft"])
def test_bf16(name):
    z, t, A, old, mask, ref = make(dtype=torch.bfloat16, seed=7)
    est = Estimator.preset(name, entropy_coef=0.01)
    kw = kwargs_for(est, 24, A, old, mask, ref)
    loss, grad, _ = run(z, t, est, **kw)
    rl, rg, _ = reference(z, t, est, **kw)
    assert grad.dtype == torch.bfloat16
    assert abs(float(loss) - float(rl)) <= 2e-2 * abs(float(rl))
    assert rel(grad, rg) < 2e-2


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm", "token-sum-norm", "token-sum"])
def test_aggregation_modes_and_dual_clip(agg):
    z, t, A, old, mask, ref = make(seed=11, spread=1.5)
    est = Estimator.preset("ppo", dual_clip=2.0, agg_norm=50.0)
    kw = dict(advantages=A, old_logp=old, mask=mask, seq_ids=torch.arange(24) // 5, agg=agg)
    loss, grad, m = run(z, t, est, **kw)
    rl, rg, rm = reference(z, t, est, **kw)
    assert float(rm["clip_ratio/dual"]) > 0 and float(m["clip_ratio/dual"]) == pytest.approx(float(rm["clip_ratio/dual"]))
    assert abs(float(loss) - float(rl)) <= 1e-5 * abs(float(rl))
    assert rel(grad, rg) < 1e-5


def test_three_d_logits_odd_vocab_and_weights():
    z, t, A, old, mask, ref = make(N=12, V=50257, seed=5)
    z, t = z.view(3, 4, -1), t.view(3, 4)
    est = Estimator.preset("hpt")
    off = (torch.arange(12) >= 8).view(3, 4)
    w = torch.rand(3, 4) + 0.1
    kw = dict(advantages=A.view(3, 4), old_logp=old.view(3, 4), mask=mask.view(3, 4), offline=off, weight=w)
    zz = z.clone().requires_grad_()
    loss, _ = fused_policy_loss(zz, t, est, temperature=T, **kw)  # default block size: 8192, masked tail
    loss.backward()
    rl, rg, _ = reference(z, t, est, **kw)
    assert abs(float(loss) - float(rl)) <= 1e-5 * abs(float(rl))
    assert rel(zz.grad, rg) < 1e-5
    assert bool((zz.grad.view(12, -1)[~mask.view(-1)] == 0).all())  # masked rows: zero gradient


def test_inplace_backward_and_grad_output_scaling():
    z, t, A, old, mask, ref = make(seed=2)
    est = Estimator.preset("grpo")
    kw = dict(advantages=A, old_logp=old, mask=mask)
    zz = z.clone().requires_grad_()
    loss, _ = fused_policy_loss(zz, t, est, temperature=T, block_v=256, **kw)
    (3.0 * loss).backward()
    _, rg, _ = reference(z, t, est, **kw)
    assert rel(zz.grad, 3.0 * rg) < 1e-5
    _, g_in, _ = run(z, t, est, inplace=True, **kw)
    assert rel(g_in, rg) < 1e-5


def test_all_masked_is_zero_loss_zero_grad():
    z, t, A, old, _, _ = make(seed=3)
    zz = z.clone().requires_grad_()
    loss, _ = fused_policy_loss(zz, t, Estimator.preset("grpo"), advantages=A, old_logp=old,
                                mask=torch.zeros(24, dtype=torch.bool), block_v=256)
    loss.backward()
    assert float(loss) == 0.0 and bool((zz.grad == 0).all())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_token_logprobs_and_both_gradients(dtype, tol):
    z, t, *_ = make(seed=4, dtype=dtype)
    zz = z.clone().requires_grad_()
    lp, ent = token_logprobs(zz, t, T, return_entropy=True, block_v=256)
    g1, g2 = torch.randn(24), torch.randn(24)
    (lp * g1 + ent * g2).sum().backward()
    zd = z.double().requires_grad_()
    logq = torch.log_softmax(zd / T, -1)
    lpr = logq.gather(-1, t[:, None])[:, 0]
    entr = -(logq.exp() * logq).sum(-1)
    (lpr * g1.double() + entr * g2.double()).sum().backward()
    assert lp.dtype == torch.float32
    assert rel(lp, lpr) < tol and rel(ent, entr) < tol and rel(zz.grad, zd.grad) < tol


def test_token_logprobs_inplace_backward():
    z, t, *_ = make(seed=6)
    leaf = z.clone().requires_grad_()
    lp = token_logprobs(leaf * 1.0, t, T, inplace_backward=True, block_v=256)
    lp.sum().backward()
    zd = z.double().requires_grad_()
    torch.log_softmax(zd / T, -1).gather(-1, t[:, None]).sum().backward()
    assert rel(leaf.grad, zd.grad) < 1e-5


# -- bad inputs: a clear error naming the argument -----------------------------------------------------------------
def test_bad_inputs():
    z, t, A, old, mask, _ = make(N=8, V=300)
    est = Estimator.preset("grpo")
    with pytest.raises(ValueError, match="targets has shape"):
        fused_policy_loss(z, t[:4], est, advantages=A, old_logp=old)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 300\)"):
        fused_policy_loss(z, torch.full((8,), 300), est, advantages=A, old_logp=old)
    with pytest.raises(TypeError, match="targets must be an integer"):
        token_logprobs(z, t.float())
    with pytest.raises(ValueError, match="old_logp= is required"):
        fused_policy_loss(z, t, est, advantages=A)
    bad = A.clone()
    bad[1] = float("inf")
    with pytest.raises(ValueError, match="advantages contains non-finite"):
        fused_policy_loss(z, t, est, advantages=bad, old_logp=old)
    zn = z.clone()
    zn[3, 7] = float("nan")
    with pytest.raises(ValueError, match="logits contain non-finite"):
        fused_policy_loss(zn, t, est, advantages=A, old_logp=old)
    with pytest.raises(ValueError, match="logits contain non-finite"):
        token_logprobs(zn, t)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(z, t, temperature=0.0)
    with pytest.raises(ValueError, match="advantages has shape"):
        fused_policy_loss(z, t, est, advantages=A[:3], old_logp=old)
