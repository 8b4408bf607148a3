"""TRL-named TrainConfig keys mean what TRL means: for each TRL-named setting (loss_type, epsilon, epsilon_high, beta,
max_completion_length), the loss and gradient of `TrainConfig.estimator()` (aggregated as fastupg's trainer does: over
the whole batch, padded length = max_completion_length) equal TRL's installed GRPOTrainer._compute_loss on the same
inputs. TRL's method runs unbound on a stand-in `self` holding the attributes it reads, with the per-token log-probs
handed in, so no model is needed."""
import os

# set before anything imports triton (TRL/verl do, at import): the kernel tests in the same session need the interpreter
os.environ.setdefault("TRITON_INTERPRET", "1")

import types

import pytest
import torch

import trl
from trl import GRPOTrainer  # noqa: E402

from fastupg import policy_loss  # noqa: E402
from fastupg.config import load_config  # noqa: E402

B, T = 6, 8


class _Accel:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(logp, ent, inputs, *, loss_type, epsilon=0.2, epsilon_high=None, beta=0.0):
    args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    me = types.SimpleNamespace(
        args=args, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high, beta=beta, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", use_vllm=False,
        vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=T, accelerator=_Accel(),
        aux_loss_enabled=False, _entropy_bonus_enabled=False, _metrics={"train": __import__("collections").defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, ent, None))
    return GRPOTrainer._compute_loss(me, None, inputs)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    mask[4, 2:] = 0
    m = mask.to(logp.dtype)
    old = (logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.8) * m
    ref = (logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3) * m
    A = torch.randn(B, generator=g, dtype=torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64)
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask, advantages=A,
                  old_per_token_logps=old, ref_per_token_logps=ref, num_items_in_batch=m.sum())
    return logp * m, ent, inputs


# (TrainConfig overrides, TRL arguments)
SETTINGS = [
    (["loss_type=grpo"], dict(loss_type="grpo")),
    (["loss_type=grpo", "epsilon=0.1"], dict(loss_type="grpo", epsilon=0.1)),
    (["loss_type=grpo", "epsilon=0.1", "epsilon_high=0.3"], dict(loss_type="grpo", epsilon=0.1, epsilon_high=0.3)),
    (["loss_type=bnpo"], dict(loss_type="bnpo")),
    (["loss_type=dr_grpo"], dict(loss_type="dr_grpo")),
    (["loss_type=dapo"], dict(loss_type="dapo")),
    (["loss_type=dapo", "epsilon_high=0.28"], dict(loss_type="dapo", epsilon_high=0.28)),
    (["loss_type=cispo", "epsilon_high=5.0"], dict(loss_type="cispo", epsilon_high=5.0)),
    (["loss_type=cispo", "epsilon=2.0"], dict(loss_type="cispo", epsilon=2.0)),
    (["loss_type=grpo", "beta=0.04"], dict(loss_type="grpo", beta=0.04)),
    (["loss_type=dr_grpo", "beta=0.1", "epsilon=0.3"], dict(loss_type="dr_grpo", beta=0.1, epsilon=0.3)),
]


@pytest.mark.parametrize("overrides,trl_args", SETTINGS, ids=[" ".join(o) for o, _ in SETTINGS])
def test_trl_named_setting_is_trls_loss(overrides, trl_args):
    cfg = load_config(None, overrides + [f"max_completion_length={T}", f"num_generations={B}",
                                         f"per_device_train_batch_size={B}"])
    logp0, ent, inputs = _data()
    lp = logp0.clone().requires_grad_()
    want = _trl_loss(lp, ent, inputs, **trl_args)
    want.backward()
    g_want = lp.grad

    lp2 = logp0.clone().requires_grad_()
    mask = inputs["completion_mask"].bool()
    A = inputs["advantages"][:, None].expand(B, T)
    got, _ = policy_loss(lp2, cfg.estimator(), advantages=A, old_logp=inputs["old_per_token_logps"], mask=mask,
                         ref_logp=inputs["ref_per_token_logps"] if cfg.beta else None)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lp2.grad, g_want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("overrides,key", [(["loss_type=cispo", "epsilon=0.2"], "epsilon=0.2"),
                                           (["loss_type=cispo", "epsilon_high=0.28"], "epsilon_high=0.28")])
def test_cispo_cap_below_one_is_refused_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        load_config(None, overrides)


def test_fastupg_presets_keep_their_bounds():
    assert load_config(None, ["loss_type=gspo"]).estimator().eps_low == 3e-4
    assert load_config(None, ["loss_type=gspo"]).estimator().eps_high == 4e-4
    est = load_config(None, ["loss_type=cispo"]).estimator()  # no TRL key given: the preset's cap 1.28, no lower bound
    assert (est.eps_low, est.eps_high) == (1.0, 0.28)
    # a TRL key given to a fastupg preset means TRL's: epsilon_high defaults to epsilon
    est = load_config(None, ["loss_type=gspo", "epsilon=1e-3"]).estimator()
    assert (est.eps_low, est.eps_high) == (1e-3, 1e-3)
