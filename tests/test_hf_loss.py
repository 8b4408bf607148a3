"""fastupg.models.hf_loss against the plain Hugging Face path (model(...).logits -> log_softmax -> policy_loss)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton impl runs on CPU through the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

from fastupg.estimator import Estimator, policy_loss  # noqa: E402
from fastupg.models import causal_lm_logprobs, causal_lm_policy_loss  # noqa: E402

import transformers

V, B, T, TEMP = 301, 3, 10, 0.7


def _model(tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    m = transformers.Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():  # HF init gives near-uniform logits; sharpen them so clipping and confident tokens occur
        m.get_output_embeddings().weight.mul_(8.0)
    assert (m.get_output_embeddings().weight is m.get_input_embeddings().weight) == tied
    return m


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    input_ids, targets = ids[:, :-1], ids[:, 1:].clone()
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, 7:] = 0  # right padding in one row
    mask = attn.bool().clone()
    mask[:, :2] = False  # "prompt" tokens
    targets[~attn.bool()] = 0
    kw = dict(advantages=torch.randn(B, T, generator=g), mask=mask)
    return input_ids, targets, attn, kw


def _plain(model, input_ids, targets, attn, est, kw):
    logits = model(input_ids=input_ids, attention_mask=attn).logits.float() / TEMP
    lp = torch.log_softmax(logits, -1)
    logp = lp.gather(-1, targets[..., None])[..., 0]
    ent = -(lp.exp() * lp).sum(-1)
    return logp, ent


@pytest.mark.parametrize("impl,tied", [("torch", True), ("chunked", True), ("chunked", False), ("triton", False)])
def test_policy_loss_and_parameter_gradients_match_plain_path(tied, impl):
    model = _model(tied)
    input_ids, targets, attn, kw = _batch()
    est = Estimator.preset("grpo", entropy_coef=0.01)
    with torch.no_grad():
        logp0, _ = _plain(model, input_ids, targets, attn, est, kw)
    g = torch.Generator().manual_seed(1)
    kw["old_logp"] = logp0 + 0.3 * torch.randn(B, T, generator=g)

    logp, ent = _plain(model, input_ids, targets, attn, est, kw)
    ref_loss, ref_m = policy_loss(logp, est, entropy=ent, **kw)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert ref_m["clip_ratio/low"] + ref_m["clip_ratio/high"] > 0

    loss, m = causal_lm_policy_loss(model, input_ids, targets, est, attention_mask=attn, temperature=TEMP,
                                    impl=impl, **kw)
    loss.backward()
    assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 1e-5 * max(1.0, abs(float(ref_loss.detach())))
    assert abs(float(m["entropy"]) - float(ref_m["entropy"])) < 1e-4
    for n, p in model.named_parameters():
        r = ref_grads[n]
        assert p.grad is not None, n
        assert r.abs().sum() > 0, n  # every parameter gets a real gradient: the comparison can fail
        err = float((p.grad - r).norm() / r.norm())
        assert err < 1e-4, f"{n}: relative gradient error {err:.3g}"


def test_logprobs_match_plain_path():
    model = _model(tied=False, seed=3)
    input_ids, targets, attn, kw = _batch(seed=3)
    with torch.no_grad():
        ref_lp, ref_ent = _plain(model, input_ids, targets, attn, None, kw)
        lp, ent = causal_lm_logprobs(model, input_ids, targets, attention_mask=attn, temperature=TEMP,
                                     return_entropy=True, impl="chunked")
    assert lp.shape == (B, T)
    assert torch.allclose(lp, ref_lp, atol=1e-5, rtol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5, rtol=1e-5)


def test_rejects_non_causal_lm():
    with pytest.raises(TypeError, match="estimator"):
        causal_lm_policy_loss(_model(True), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                              "grpo", advantages=torch.ones(1, 2))
    with pytest.raises(TypeError, match="causal LM"):
        causal_lm_logprobs(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long),
                           torch.zeros(1, 2, dtype=torch.long))
