"""The unified estimator against the paper's table, written out independently per token (docs/math.md §1)."""
import math

import pytest
import torch

from fastupg import Branch, Estimator, PRESETS, policy_loss
from fastupg.estimator import aggregation_weights

torch.manual_seed(0)
DT = torch.float64


def _data(n=64, seed=0, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    l = -torch.rand(n, generator=g, dtype=DT) * 3 - 0.05          # log-probs in (-3.05, -0.05)
    A = torch.randn(n, generator=g, dtype=DT)
    old = l + torch.randn(n, generator=g, dtype=DT) * spread      # ratios well outside 1 +- 0.2 on both sides
    return l, A, old


def _grad(est, l, **kw):
    l = l.clone().requires_grad_()
    loss, m = policy_loss(l, est, agg="token-sum", **kw)
    loss.backward()
    return l.grad, loss, m


def test_policy_ref_gives_minus_A():  # SFT / REINFORCE: grad = -A grad log p
    l, A, _ = _data()
    g, _, _ = _grad(Estimator.preset("reinforce"), l, advantages=A)
    torch.testing.assert_close(g, -A)


def test_one_ref_gives_minus_A_grad_p():  # pi_ref = 1: grad = -A grad p = -A p grad log p
    l, A, _ = _data()
    est = Estimator(online=None, offline=Branch("one", "none", "mixed"))
    g, _, _ = _grad(est, l, advantages=A)
    torch.testing.assert_close(g, -A * l.exp())


def test_luffy_shaping():  # rho = p/(p+gamma): d rho/dl = gamma p / (p+gamma)^2
    l, A, _ = _data()
    est = Estimator.preset("luffy")
    off = torch.ones_like(l, dtype=torch.bool)
    g, _, _ = _grad(est, l, advantages=A, offline=off)
    p = l.exp()
    torch.testing.assert_close(g, -A * 0.1 * p / (p + 0.1) ** 2)


@pytest.mark.parametrize("el,eh", [(0.2, 0.2), (0.2, 0.28)])
def test_old_clip_table(el, eh):  # -A r inside the trust region, 0 where the clipped side is active
    l, A, old = _data()
    est = Estimator.preset("grpo", eps_low=el, eps_high=eh)
    g, _, m = _grad(est, l, advantages=A, old_logp=old)
    r = (l - old).exp()
    expected = []
    for ri, ai in zip(r.tolist(), A.tolist()):
        clipped = (ai > 0 and ri > 1 + eh) or (ai < 0 and ri < 1 - el)
        expected.append(0.0 if clipped else -ai * ri)
    expected = torch.tensor(expected, dtype=DT)
    assert (expected == 0).sum() >= 5 and (expected != 0).sum() >= 5   # both regimes exercised
    torch.testing.assert_close(g, expected)
    assert m["clip_ratio/low"] > 0 and m["clip_ratio/high"] > 0


def test_dual_clip():
    l, A, old = _data(spread=1.5)
    est = Estimator.preset("ppo", dual_clip=3.0)
    g, _, m = _grad(est, l, advantages=A, old_logp=old)
    r = (l - old).exp()
    exp = []
    for ri, ai in zip(r.tolist(), A.tolist()):
        if ai < 0 and ri > 3.0:
            exp.append(0.0)
        elif (ai > 0 and ri > 1.2) or (ai < 0 and ri < 0.8):
            exp.append(0.0)
        else:
            exp.append(-ai * ri)
    assert any(ai < 0 and ri > 3 for ri, ai in zip(r.tolist(), A.tolist()))
    torch.testing.assert_close(g, torch.tensor(exp, dtype=DT))
    assert m["clip_ratio/dual"] > 0


def test_cispo_keeps_gradient_of_clipped_tokens():  # -sg(clip(r)) A grad log p
    l, A, old = _data()
    est = Estimator.preset("cispo")
    g, _, _ = _grad(est, l, advantages=A, old_logp=old)
    r = (l - old).exp()
    torch.testing.assert_close(g, -r.clamp(0.0, 1.28) * A)
    assert bool((r > 1.28).any())


def test_gspo_sequence_ratio():
    l, A, old = _data(n=24, spread=0.002)
    seq = torch.arange(24) // 6
    A = A.reshape(4, 6)[:, :1].expand(4, 6).reshape(-1).contiguous()   # one advantage per sequence
    est = Estimator.preset("gspo")
    g, _, _ = _grad(est, l, advantages=A, old_logp=old, seq_ids=seq)
    exp = torch.empty_like(l)
    for i in range(4):
        sl = slice(6 * i, 6 * i + 6)
        s = math.exp(float((l[sl] - old[sl]).mean()))
        a = float(A[6 * i])
        clipped = (a > 0 and s > 1 + 4e-4) or (a < 0 and s < 1 - 3e-4)
        exp[sl] = 0.0 if clipped else -a * s
    torch.testing.assert_close(g, exp)


def test_entropy_and_kl_terms():
    l, A, old = _data()
    H = torch.rand_like(l) * 2
    ref = l + 0.3 * torch.randn_like(l)
    est = Estimator.preset("reinforce", entropy_coef=0.01, kl_coef=0.1, kl_estimator="k3")
    g, loss, m = _grad(est, l, advantages=A, entropy=H, ref_logp=ref)
    torch.testing.assert_close(g, -A + 0.1 * (1 - (ref - l).exp()))
    torch.testing.assert_close(loss, (-A * l - 0.01 * H + 0.1 * ((ref - l).exp() - (ref - l) - 1)).sum())


def test_mixed_branches_and_weights():  # HPT: alpha on rollouts, beta on demonstrations, per token
    l, A, old = _data()
    off = torch.arange(64) >= 40
    w = torch.rand(64, dtype=DT)
    est = Estimator.preset("hpt", offline=Branch("policy", "none", "one", coef=0.3))
    ones = torch.where(off, torch.ones_like(A), A)
    g, _, _ = _grad(est, l, advantages=ones, old_logp=old, offline=off, weight=w)
    r = (l - old).exp()
    on_grad = torch.where(((A > 0) & (r > 1.2)) | ((A < 0) & (r < 0.8)), torch.zeros_like(r), -A * r)
    torch.testing.assert_close(g, w * torch.where(off, -0.3 * torch.ones_like(l), on_grad))


def test_aggregation_modes():
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0], dtype=torch.bool)
    seq = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    est = Estimator.preset("grpo", agg_norm=16.0)
    off = torch.zeros(8, dtype=torch.bool)
    w = lambda mode: aggregation_weights(est, mask, off, seq, mode).tolist()  # noqa: E731
    m = mask.double().tolist()
    assert w("token-sum") == m
    assert w("token-mean") == pytest.approx([x / 5 for x in m])
    # sequence 2 has no unmasked tokens: it is not counted
    assert w("seq-mean-token-mean") == pytest.approx([.25, .25, 0, 1 / 6, 1 / 6, 1 / 6, 0, 0])
    assert w("seq-mean-token-sum") == pytest.approx([x / 2 for x in m])
    # verl's seq-mean-token-sum-norm: seq-mean of token sums / C (2 non-empty sequences); token-sum-norm: sum / C
    assert w("seq-mean-token-sum-norm") == pytest.approx([x / (2 * 16) for x in m])
    assert w("token-sum-norm") == pytest.approx([x / 16 for x in m])


def test_separate_branch_aggregation():  # official HPT code: RL sum/8192, SFT pooled token mean
    est = Estimator.preset("hpt", agg="token-sum-norm", agg_norm=8192.0, offline_agg="token-mean")
    mask = torch.ones(6, dtype=torch.bool)
    off = torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.bool)
    w = aggregation_weights(est, mask, off, None).tolist()
    assert w == pytest.approx([1 / 8192] * 4 + [0.5, 0.5])


def test_two_d_input_matches_flat():
    l, A, old = _data(n=24)
    est = Estimator.preset("grpo", agg="seq-mean-token-mean")
    a, _ = policy_loss(l.view(4, 6), est, advantages=A.view(4, 6), old_logp=old.view(4, 6))
    b, _ = policy_loss(l, est, advantages=A, old_logp=old, seq_ids=torch.arange(24) // 6)
    torch.testing.assert_close(a, b)


def test_all_masked_gives_zero_loss_and_zero_grad():
    l, A, old = _data(n=8)
    l.requires_grad_()
    loss, _ = policy_loss(l, Estimator.preset("grpo"), advantages=A, old_logp=old,
                          mask=torch.zeros(8, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and bool((l.grad == 0).all())


def test_masked_garbage_old_logp_does_not_poison_gradient():
    l, A, old = _data(n=8)
    old = old.float()
    old[3] = -500.0  # padding garbage: exp(l - old) overflows
    mask = torch.ones(8, dtype=torch.bool)
    mask[3] = False
    lf = l.float().requires_grad_()
    loss, _ = policy_loss(lf, Estimator.preset("grpo"), advantages=A.float(), old_logp=old, mask=mask)
    loss.backward()
    assert bool(torch.isfinite(lf.grad).all()) and lf.grad[3] == 0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_runs_and_has_finite_gradient(name):
    l, A, old = _data(n=24)
    est = Estimator.preset(name, agg_norm=32.0)
    off = None
    if est.online is not None and est.offline is not None:
        off = torch.arange(24) >= 18
    g, loss, _ = _grad(est, l, advantages=A, old_logp=old, offline=off, seq_ids=torch.arange(24) // 6)
    assert torch.isfinite(loss) and bool(torch.isfinite(g).all()) and bool((g != 0).any())


# -- bad input --------------------------------------------------------------------------------------
def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset 'gpro'"):
        Estimator.preset("gpro")
    with pytest.raises(ValueError, match="epsilon"):
        Estimator.preset("grpo", epsilon=0.2)


@pytest.mark.parametrize("kw,match", [
    (dict(ref="policy", mask="clip"), "Branch.mask"),
    (dict(ref="one", mask="cispo"), "Branch.mask='cispo'"),
    (dict(ref="olde"), "Branch.ref"),
    (dict(ref="old", advantage="ppo"), "Branch.advantage"),
])
def test_impossible_branches(kw, match):
    with pytest.raises(ValueError, match=match):
        Branch(**kw)


def test_impossible_estimators():
    with pytest.raises(ValueError, match="offline.ref"):
        Estimator(online=None, offline=Branch("old", "clip", "grpo"))
    with pytest.raises(ValueError, match="agg"):
        Estimator.preset("grpo", agg="mean")
    with pytest.raises(ValueError, match="dual_clip"):
        Estimator.preset("ppo", dual_clip=0.5)


def test_bad_tensors_are_named():
    l, A, old = _data(n=8)
    est = Estimator.preset("grpo")
    with pytest.raises(ValueError, match="old_logp= is required"):
        policy_loss(l, est, advantages=A)
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(l, est, advantages=A[:4], old_logp=old)
    bad = A.clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match="advantages contains non-finite"):
        policy_loss(l, est, advantages=bad, old_logp=old)
    with pytest.raises(TypeError, match="seq_ids must be an integer"):
        policy_loss(l, est, advantages=A, old_logp=old, seq_ids=torch.zeros(8))
    with pytest.raises(ValueError, match="no offline branch"):
        policy_loss(l, est, advantages=A, old_logp=old, offline=torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="entropy= is required"):
        policy_loss(l, Estimator.preset("grpo", entropy_coef=0.1), advantages=A, old_logp=old)
    with pytest.raises(ValueError, match="agg_norm"):
        policy_loss(l, Estimator.preset("dr_grpo"), advantages=A, old_logp=old)


# -- issue 12 item 4: a branch with advantage 'one' uses A = 1; advantages= optional when no branch needs it -----------
def test_advantage_one_branch_ignores_the_advantage_tensor():
    """HPT with a GRPO advantage tensor: demonstration tokens (SFT branch, advantage 'one') get A = 1, not the
    group advantage that happens to sit in the tensor (the old code weighted them by it)."""
    l, A, old = _data()
    off = torch.arange(64) >= 40
    est = Estimator.preset("hpt")
    g, _, _ = _grad(est, l, advantages=A, old_logp=old, offline=off)
    ones = torch.where(off, torch.ones_like(A), A)
    g_ref, _, _ = _grad(est, l, advantages=ones, old_logp=old, offline=off)
    torch.testing.assert_close(g, g_ref)
    assert torch.equal(g[off], -torch.ones(24, dtype=DT))   # token-sum: d(-l)/dl = -1, not -A


def test_sft_needs_no_advantages_and_ignores_given_ones():
    l, A, _ = _data()
    est = Estimator.preset("sft")
    g0, loss0, _ = _grad(est, l)
    g1, loss1, _ = _grad(est, l, advantages=A)
    torch.testing.assert_close(g0, -torch.ones_like(l))
    torch.testing.assert_close(g1, g0)
    torch.testing.assert_close(loss0, -l.sum())
    torch.testing.assert_close(loss1, loss0)


def test_advantages_required_names_the_branch():
    l, _, old = _data()
    with pytest.raises(ValueError, match=r"advantages= is required.*online \(advantage='grpo'\)"):
        policy_loss(l, Estimator.preset("grpo"), old_logp=old)
    with pytest.raises(ValueError, match=r"advantages= is required.*online"):
        policy_loss(l, Estimator.preset("hpt"), old_logp=old, offline=torch.arange(64) >= 40)


def test_prepare_inputs_adv_is_one_on_sft_tokens():
    """The contract the Triton kernels rely on: prepare_inputs' `adv` already holds A = 1 on 'one' tokens."""
    from fastupg.estimator import prepare_inputs
    _, A, old = _data()
    off = torch.arange(64) >= 40
    x = prepare_inputs((64,), Estimator.preset("hpt"), advantages=A, old_logp=old, offline=off)
    assert torch.equal(x["adv"][off], torch.ones(24, dtype=DT))
    assert torch.equal(x["adv"][~off], A[~off])
    x = prepare_inputs((4, 16), Estimator.preset("sft"), advantages=None)
    assert torch.equal(x["adv"], torch.ones(64))


@pytest.mark.parametrize("field,value", [("eps_high", "0.2"), ("eps_low", None), ("kl_coef", "0.1"),
                                         ("agg", 3), ("adv_std", 1), ("dual_clip", "3")])
def test_preset_override_of_wrong_type_names_the_field(field, value):
    with pytest.raises(TypeError, match=f"Estimator.{field} must be"):
        Estimator.preset("grpo", **{field: value})


def test_branch_coef_of_wrong_type_names_the_field():
    with pytest.raises(TypeError, match="Branch.coef must be a number"):
        Branch("policy", coef="0.5")


def test_fused_linear_paths_use_one_on_sft_tokens():
    """The fused-linear loss (one-pass chunked and two-pass) gets A = 1 on SFT tokens through prepare_inputs' `adv`."""
    from fastupg.kernels.fused_linear import fused_linear_policy_loss
    g = torch.Generator().manual_seed(7)
    N, D, V = 24, 8, 37
    h = torch.randn(N, D, generator=g, dtype=DT)
    w = torch.randn(V, D, generator=g, dtype=DT)
    tgt = torch.randint(0, V, (N,), generator=g)
    A = torch.randn(N, generator=g, dtype=DT)
    off = torch.arange(N) >= 16
    est = Estimator.preset("hpt")
    ones_on_sft = torch.where(off, torch.ones_like(A), A)
    old = torch.log_softmax(h @ w.t(), -1).gather(1, tgt[:, None]).squeeze(1) + 0.3 * torch.randn(N, generator=g,
                                                                                                  dtype=DT)
    out = []
    for adv, one_pass in ((A, True), (A, False), (ones_on_sft, False)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, _ = fused_linear_policy_loss(hh, ww, tgt, est, advantages=adv, old_logp=old, offline=off,
                                           impl="chunked",
                                           one_pass=one_pass)
        loss.backward()
        out.append((loss.detach(), hh.grad, ww.grad))
    for got in out[:2]:
        for a, b in zip(got, out[2]):
            torch.testing.assert_close(a, b)


def test_fractional_mask_is_refused_not_rounded_to_one():
    """policy_loss used to take mask=0.5 as 1 (issue 15 item 6); the logits API refuses it, and so does this path."""
    import pytest
    import torch
    from fastupg import Estimator, policy_loss
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(2, 5, generator=g)
    A = torch.randn(2, 5, generator=g)
    with pytest.raises(ValueError, match="mask must hold 0/1"):
        policy_loss(logp, Estimator.preset("grpo"), advantages=A, old_logp=logp.detach(), mask=torch.full((2, 5), 0.5))
    ok, _ = policy_loss(logp, Estimator.preset("grpo"), advantages=A, old_logp=logp.detach(),
                        mask=torch.ones(2, 5))  # a float 0/1 mask is still fine
    assert torch.isfinite(ok)
