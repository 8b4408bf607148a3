"""fastupg.integrations.verl against the real verl package (verl.trainer.ppo.core_algos, verl 0.9.1): each registered
fastupg loss gives verl's own loss, gradient and metrics on the same inputs, for every loss_agg_mode."""
import os

# set before anything imports triton (TRL/verl do, at import): the kernel tests in the same session need the interpreter
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import verl.trainer.ppo.core_algos as core_algos
from verl.workers.config import ActorConfig  # noqa: E402

from fastupg import Estimator  # noqa: E402
from fastupg.estimator import aggregation_weights  # noqa: E402
from fastupg.integrations.verl import (register_fastupg_policy_losses, verl_aggregation_weights,  # noqa: E402
                                      verl_policy_loss)

B, T = 5, 9
MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"]


def _config(**kw):
    return ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=4, **kw)


def _batch(seed=0, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    A = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous()
    A[0] = 2.0 * torch.rand(T, generator=g, dtype=torch.float64) - 3.0  # token advantages, strongly negative: dual clip
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 6:] = 0
    mask[3, 2:] = 0
    mask[4] = 0  # an empty sequence: verl's seq-mean modes leave it out
    is_w = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    return logp, old, A, mask, is_w


def _both(verl_fn, ours, mode, cfg, use_is, seed=0, spread=0.6):
    logp, old, A, mask, is_w = _batch(seed, spread)
    out = []
    for fn in (verl_fn, ours):
        lp = logp.clone().requires_grad_()
        loss, metrics = fn(old_log_prob=old, log_prob=lp, advantages=A, response_mask=mask, loss_agg_mode=mode,
                           config=cfg, rollout_is_weights=is_w if use_is else None)
        loss.backward()
        out.append((loss.detach(), lp.grad, metrics))
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_is", [False, True])
def test_fastupg_grpo_is_verl_vanilla(mode, use_is):
    cfg = _config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    (l0, g0, m0), (l1, g1, m1) = _both(core_algos.compute_policy_loss_vanilla,
                                       verl_policy_loss(Estimator.preset("grpo")), mode, cfg, use_is)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g1, g0, rtol=1e-12, atol=1e-14)
    assert m1.keys() == m0.keys()
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-12, abs=1e-14), k
    assert m0["actor/pg_clipfrac"] > 0 and m0["actor/pg_clipfrac_lower"] > 0  # the batch exercises both clips


@pytest.mark.parametrize("mode", MODES)
def test_fastupg_gspo_is_verl_gspo(mode):
    cfg = _config(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    (l0, g0, m0), (l1, g1, m1) = _both(core_algos.compute_policy_loss_gspo,
                                       verl_policy_loss(Estimator.preset("gspo")), mode, cfg, True, spread=0.02)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g1, g0, rtol=1e-12, atol=1e-14)
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-12, abs=1e-14), k


@pytest.mark.parametrize("mode", MODES)
def test_fastupg_cispo_is_verl_cispo(mode):
    cfg = _config(clip_ratio_low=0.2, clip_ratio_high=0.28)
    (l0, g0, m0), (l1, g1, m1) = _both(core_algos.compute_policy_loss_cispo,
                                       verl_policy_loss(Estimator.preset("cispo")), mode, cfg, True)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g1, g0, rtol=1e-12, atol=1e-14)
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-12, abs=1e-14), k


def test_global_batch_info_is_honoured():
    """dp_size / batch_num_tokens / global_batch_size / loss_scale_factor: verl's agg_loss itself, every mode."""
    _, _, _, mask, _ = _batch()
    g = torch.Generator().manual_seed(3)
    loss_mat = torch.randn(B, T, generator=g, dtype=torch.float64)
    for mode in MODES:
        for info in ({}, dict(dp_size=4, batch_num_tokens=97, global_batch_size=13, loss_scale_factor=64)):
            want = core_algos.agg_loss(loss_mat, mask, mode, **info)
            got = (verl_aggregation_weights(mask, mode, **info) * loss_mat).sum()
            torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-12, atol=1e-14)


def test_fastupg_aggregation_modes_agree_with_verl_agg_loss():
    """fastupg's own Estimator.agg names that verl also has mean what verl's agg_loss computes (one process)."""
    _, _, _, mask, _ = _batch()
    g = torch.Generator().manual_seed(4)
    loss_mat = torch.randn(B, T, generator=g, dtype=torch.float64)
    for mode in MODES:
        est = Estimator.preset("grpo", agg=mode, agg_norm=float(T))
        seq = torch.arange(B)[:, None].expand(B, T).reshape(-1)
        s = aggregation_weights(est, mask.reshape(-1).bool(), torch.zeros(B * T, dtype=torch.bool), seq, padded_len=T)
        want = core_algos.agg_loss(loss_mat, mask, mode)
        torch.testing.assert_close((s * loss_mat.reshape(-1)).sum(), want, rtol=1e-7, atol=1e-12)


def test_registered_names_resolve_through_verl():
    names = register_fastupg_policy_losses()
    assert "fastupg_grpo" in names and "fastupg_gspo" in names
    fn = core_algos.get_policy_loss_fn("fastupg_cispo")
    assert fn.__name__ == "compute_policy_loss_fastupg_cispo"
    with pytest.raises(ValueError, match="on-policy tokens only"):
        verl_policy_loss(Estimator.preset("hpt"))
