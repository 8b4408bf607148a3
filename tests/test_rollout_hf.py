"""HFRolloutEngine against the rollout protocol, with the embedded tiny model."""
import pytest
import torch

from fastupg.rollout.base import Rollout, SamplingConfig
from fastupg.rollout.hf import HFRolloutEngine
from fastupg.task.tiny import build_tiny_model, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    m = build_tiny_model(None, tok, size="micro", seed=0)
    # random init is near-uniform: sharpen the output so log-probs span a real range
    # (the final norm's weight scales the logits)
    with torch.no_grad():
        m.model.norm.weight.mul_(4.0)
    return m


def _prompts(tok, qs):
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                    return_dict=True)["input_ids"] for q in qs]


def _recompute(model, prompt, completion, temperature):
    x = torch.tensor([prompt + completion])
    with torch.no_grad():
        z = model(x).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(z / temperature, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, -1), (0.7, 0.9, 20)])
def test_n_rollouts_and_logprobs_match_forward(tok, model, temperature, top_p, top_k):
    # prompts of different lengths: left padding must not shift positions
    prompts = _prompts(tok, ["What is 1+2-3?", "What is 12+345*6-7?", "Hi"])
    eng = HFRolloutEngine(model, tok)
    # extra stop ids (besides eos) so that some samples stop early and some hit the limit
    stops = tuple(range(100, 115))
    s = SamplingConfig(n=3, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=24, seed=1,
                       stop_token_ids=stops)
    stop = set(stops) | {tok.eos_token_id}
    out = eng.generate(prompts, s)
    assert len(out) == 3 and all(len(g) == 3 for g in out)
    for p, group in zip(prompts, out):
        for r in group:
            assert isinstance(r, Rollout) and r.prompt_ids == p
            assert 1 <= len(r.completion_ids) <= 24 and len(r.logprobs) == len(r.completion_ids)
            want = _recompute(model, p, r.completion_ids, temperature)
            torch.testing.assert_close(torch.tensor(r.logprobs), want, rtol=0, atol=1e-4)
            assert r.text == tok.decode(r.completion_ids, skip_special_tokens=True)
            if r.truncated:
                assert len(r.completion_ids) == 24 and not stop & set(r.completion_ids)
            else:       # stopped: the stop token is included once, at the end
                assert r.completion_ids[-1] in stop
                assert not stop & set(r.completion_ids[:-1])
    lps = torch.tensor([x for g in out for r in g for x in r.logprobs])
    assert lps.std() > 0.1                                        # not a degenerate distribution
    # both endings occur with this model and length
    assert {r.truncated for g in out for r in g} == {True, False}


def test_truncation_flag(tok, model):
    eng = HFRolloutEngine(model, tok, eos_token_id=[len(tok) + 5])   # an id never sampled
    out = eng.generate(_prompts(tok, ["What is 1+1?"]), SamplingConfig(n=4, max_new_tokens=5, seed=0))
    assert all(r.truncated and len(r.completion_ids) == 5 and len(r.logprobs) == 5 for r in out[0])


def test_seed_reproducible_train_mode_restored_and_rng_untouched(tok, model):
    prompts = _prompts(tok, ["What is 4+5?", "What is 9-8?"])
    s = SamplingConfig(n=4, max_new_tokens=12, seed=123)
    model.train()
    state = torch.random.get_rng_state()
    a = HFRolloutEngine(model, tok).generate(prompts, s)
    assert model.training                                          # restored
    assert torch.equal(torch.random.get_rng_state(), state)      # caller's RNG untouched by a seeded call
    b = HFRolloutEngine(model, tok).generate(prompts, s)
    ids = lambda o: [r.completion_ids for g in o for r in g]
    assert ids(a) == ids(b)
    # chunked: another random stream, but the same shape and still reproducible
    c1 = HFRolloutEngine(model, tok, max_batch_size=3).generate(prompts, s)
    c2 = HFRolloutEngine(model, tok, max_batch_size=3).generate(prompts, s)
    assert ids(c1) == ids(c2) and [len(g) for g in c1] == [4, 4]
    c = HFRolloutEngine(model, tok).generate(prompts, SamplingConfig(n=4, max_new_tokens=12, seed=124))
    assert ids(a) != ids(c)
    assert len(set(map(tuple, ids(a)))) > 1                     # n samples differ from each other
    model.eval()
    HFRolloutEngine(model, tok).generate(prompts, s)
    assert not model.training


def test_sync_weights(tok):
    m = build_tiny_model(None, tok, size="micro", seed=0)
    eng = HFRolloutEngine(m, tok)
    eng.sync_weights(m.named_parameters())                         # same object: no-op
    other = build_tiny_model(None, tok, size="micro", seed=1)
    eng.sync_weights((k, v.detach().clone()) for k, v in other.state_dict().items())
    for (k, a), b in zip(m.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="unknown"):
        eng.sync_weights([("nope.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        eng.sync_weights([("model.norm.weight", torch.zeros(3))])
    eng.sleep(), eng.wake_up()


def test_bad_inputs(tok, model):
    eng = HFRolloutEngine(model, tok)
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[]], SamplingConfig(n=1))
    with pytest.raises(TypeError):
        eng.generate([[1, 2]], {"n": 1})
    with pytest.raises(ValueError):
        HFRolloutEngine(model, tok, max_batch_size=0)
    assert eng.generate([], SamplingConfig(n=2)) == []


def test_no_generation_logits_are_kept(tok, model, monkeypatch):
    """generate is asked for no per-step logits (they would be sequences x steps x vocab floats); the log-probs
    come from one step's slab at a time and still match a forward pass."""
    seen = []
    real = model.generate

    def spy(*a, **k):
        res = real(*a, **k)
        seen.append((k["generation_config"].output_logits, getattr(res, "logits", None)))
        return res
    monkeypatch.setattr(model, "generate", spy)
    p = _prompts(tok, ["What is 2+2?"])
    out = HFRolloutEngine(model, tok).generate(p, SamplingConfig(n=2, temperature=0.7, max_new_tokens=8, seed=4))
    assert seen and all(not flag and logits is None for flag, logits in seen)
    for r in out[0]:
        torch.testing.assert_close(torch.tensor(r.logprobs), _recompute(model, p[0], r.completion_ids, 0.7),
                                   rtol=0, atol=1e-4)
