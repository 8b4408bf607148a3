"""fastupg.integrations.trl against the real TRL: for each loss type, the drop-in's loss, parameter gradients and metrics
equal TRL's own GRPOTrainer._compute_loss on the same batch (float32, 1e-5 relative); a short GRPOTrainer run trains.

Tiny Llama built locally (fastupg.task.tiny, no download), CPU, no vLLM engine (the vLLM importance-sampling weights
are TRL's `importance_sampling_ratio` input, set by hand).
"""
import os

# set before anything imports triton (TRL/verl do, at import): the kernel tests in the same session need the interpreter
os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import pytest
import torch

import trl
import datasets

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from fastupg.integrations.trl import FusedGRPOTrainer, trl_estimator  # noqa: E402
from fastupg.task.tiny import build_tiny_model, build_tokenizer  # noqa: E402

B, TP, TC = 4, 5, 7  # rows, prompt length, completion length (= max_completion_length)
RTOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_trl")
    tok = build_tokenizer()
    model = build_tiny_model(None, tok, size="micro", seed=0)
    with torch.no_grad():  # HF init gives near-uniform logits: sharpen them so clipping and confident tokens occur
        model.get_output_embeddings().weight.mul_(6.0)
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def _reward(completions, **kw):
    return [float(len(c) % 3) for c in completions]


def _trainer(model_dir, tmp_path, **cfg):
    ds = datasets.Dataset.from_dict({"prompt": ["1+1=", "2+2=", "3+3=", "4+4="]})
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=B, num_generations=B,
                      max_completion_length=TC, report_to=[], use_cpu=True, logging_steps=1, max_steps=2,
                      save_strategy="no", bf16=False, **cfg)  # fp32: the 1e-5 comparison
    tok = build_tokenizer()
    return FusedGRPOTrainer(model=str(model_dir), reward_funcs=_reward, args=args, train_dataset=ds,
                            processing_class=tok, fastupg_chunk_bytes=4 * 262 * 5)  # 5-row chunks: really chunked


def _inputs(tr, seed=0):
    """A batch in the layout TRL's _compute_loss reads, with behaviour/reference log-probs far enough from the
    current ones that every clip branch is taken."""
    g = torch.Generator().manual_seed(seed)
    V = tr.model.config.vocab_size
    prompt_ids = torch.randint(3, V, (B, TP), generator=g)
    prompt_mask = torch.ones(B, TP, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding
    completion_ids = torch.randint(3, V, (B, TC), generator=g)
    completion_mask = torch.ones(B, TC, dtype=torch.long)
    completion_mask[0, 5:] = 0  # right padding
    completion_mask[2, 3:] = 0
    with torch.no_grad():
        logp, _, _ = tr._get_per_token_logps_and_entropies(
            tr.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), TC)
    m = completion_mask.float()
    noise = lambda s: torch.randn(B, TC, generator=g) * s * m  # noqa: E731
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=torch.randn(B, generator=g),
                  old_per_token_logps=(logp + noise(0.5)) * m, ref_per_token_logps=(logp + noise(0.3)) * m,
                  sampling_per_token_logps=(logp + noise(0.5)) * m,
                  importance_sampling_ratio=torch.rand(B, TC, generator=g) * 2,
                  num_items_in_batch=m.sum() * 2)
    if tr.loss_type == "cispo":  # ratios up to ~e^2: some above the absolute cap
        inputs["old_per_token_logps"] = (logp + noise(1.5)) * m
    return inputs


def _run(tr, fn, inputs):
    tr.model.zero_grad(set_to_none=True)
    for v in tr._metrics.values():
        v.clear()
    loss = fn(tr.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in tr._metrics["train"].items()}
    return loss.detach(), grads, metrics


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
    "grpo_kl_bias_corrected": dict(loss_type="grpo", beta=0.05),
    "dapo_kl_entropy": dict(loss_type="dapo", beta=0.05, use_bias_correction_kl=False, entropy_coef=0.01),
    "bnpo_entropy_mask_gas2": dict(loss_type="bnpo", top_entropy_quantile=0.5, entropy_coef=0.02),
    "dr_grpo_delta_opsm": dict(loss_type="dr_grpo", delta=1.5, off_policy_mask_threshold=0.05),
    "gspo_kl_vllm_is": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.05),
    "dapo_vllm_is_gas2": dict(loss_type="dapo"),
}
GAS2 = ("bnpo_entropy_mask_gas2", "dapo_vllm_is_gas2")
VLLM_IS = ("gspo_kl_vllm_is", "dapo_vllm_is_gas2")


@pytest.mark.parametrize("case", list(CASES))
def test_loss_grads_and_metrics_equal_trl(case, model_dir, tmp_path):
    tr = _trainer(model_dir, tmp_path, **CASES[case])
    tr.model.train()
    tr.current_gradient_accumulation_steps = 2 if case in GAS2 else 1
    if case in VLLM_IS:  # what TRL does with vLLM rollouts, without an engine: the ratio arrives in the batch
        tr.use_vllm, tr.vllm_importance_sampling_correction = True, True
    inputs = _inputs(tr, seed=len(case))
    ref_loss, ref_grads, ref_metrics = _run(tr, lambda m, x: GRPOTrainer._compute_loss(tr, m, x), inputs)

    head = tr.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda *a: (_ for _ in ()).throw(AssertionError("lm_head was called")))
    try:
        loss, grads, metrics = _run(tr, tr._compute_loss, inputs)
    finally:
        hook.remove()
    assert torch.isfinite(ref_loss) and float(ref_loss) != 0.0
    assert abs(float(loss) - float(ref_loss)) <= RTOL * abs(float(ref_loss)), (float(loss), float(ref_loss))
    assert grads.keys() == ref_grads.keys() and len(grads) > 5
    for n, g in ref_grads.items():
        assert _rel(grads[n], g) <= RTOL, (n, _rel(grads[n], g))
    assert metrics.keys() == ref_metrics.keys(), (sorted(metrics), sorted(ref_metrics))
    for k, v in ref_metrics.items():
        if isinstance(v, float) and math.isnan(v):
            assert math.isnan(metrics[k]), k
        else:
            assert metrics[k] == pytest.approx(v, rel=RTOL, abs=1e-7), k
    if "clip_ratio/region_mean" in ref_metrics and case != "gspo":  # the batch exercises clipping
        assert ref_metrics["clip_ratio/region_mean"] > 0
    if case == "cispo":
        assert ref_metrics["cispo_clip_ratio"] > 0


def test_unsupported_settings_are_refused(model_dir, tmp_path):
    with pytest.raises(NotImplementedError, match="use_adaptive_entropy"):
        _trainer(model_dir, tmp_path, loss_type="grpo", use_adaptive_entropy=True)
    with pytest.raises(ValueError, match="epsilon_high=0.2 with loss_type='cispo'"):
        trl_estimator("cispo", epsilon=0.2)
    with pytest.raises(ValueError, match="loss_type='sapo'"):
        trl_estimator("sapo")
    with pytest.raises(ValueError, match="delta=1.1 must be > 1 \\+ epsilon_high"):
        trl_estimator("grpo", delta=1.1)


def test_short_grpo_run_trains_and_logs(model_dir, tmp_path):
    tr = _trainer(model_dir, tmp_path, loss_type="dapo", beta=0.05, learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        for k in ("loss", "entropy", "kl", "clip_ratio/region_mean", "clip_ratio/high_max", "reward"):
            assert k in h and math.isfinite(h[k]), (k, h)
    changed = sum(not torch.equal(before[n], p.detach()) for n, p in tr.model.named_parameters())
    assert changed > 5


def test_hpt_on_trl_with_demonstrations_in_the_batch(model_dir, tmp_path):
    """HPT (what TRL cannot do): every prompt unsolved (reward 0) -> P = 0 -> beta = 1: the loss of the first step is
    the SFT loss, the token-mean NLL of the demonstrations, computed here from the plain model logits."""
    tok = build_tokenizer()
    ds = datasets.Dataset.from_dict({"prompt": ["1+1=", "2+2="], "solution": ["2", "4"]})
    args = GRPOConfig(output_dir=str(tmp_path / "hpt"), per_device_train_batch_size=B, num_generations=2,
                      max_completion_length=TC, report_to=[], use_cpu=True, logging_steps=1, max_steps=1,
                      save_strategy="no", bf16=False, learning_rate=1e-3)
    tr = FusedGRPOTrainer(model=str(model_dir), reward_funcs=lambda completions, **k: [0.0] * len(completions),
                          args=args, train_dataset=ds, processing_class=tok, fastupg_preset="hpt",
                          demonstration_column="solution")
    model = tr.model
    nll, n = 0.0, 0
    with torch.no_grad():
        for p, sol in (("1+1=", "2"), ("2+2=", "4")):
            prompt = tok(p, add_special_tokens=False)["input_ids"]  # TRL's prompt tokens (no chat template here)
            comp = tok(sol, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([prompt + comp])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1].float(), -1)
            nll -= float(lp.gather(-1, torch.tensor(comp)[:, None]).sum())
            n += len(comp)
    tr.train()
    log = [h for h in tr.state.log_history if "loss" in h][0]
    assert log["hpt/sft_fraction"] == 1.0
    assert log["loss"] == pytest.approx(nll / n, rel=1e-4)


def test_hybrid_presets_refuse_what_they_cannot_do(model_dir, tmp_path):
    with pytest.raises(ValueError, match="demonstration_column"):
        _trainer_kw = dict(fastupg_preset="hpt")
        ds = datasets.Dataset.from_dict({"prompt": ["1+1="] * 4})
        args = GRPOConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=B, num_generations=B,
                          max_completion_length=TC, report_to=[], use_cpu=True, bf16=False)
        FusedGRPOTrainer(model=str(model_dir), reward_funcs=_reward, args=args, train_dataset=ds,
                         processing_class=build_tokenizer(), **_trainer_kw)
