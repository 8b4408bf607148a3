"""fastupg.rollout.vllm: everything that does not need vLLM running, plus a GPU integration test."""
import importlib.util
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from fastupg.rollout.base import SamplingConfig
from fastupg.rollout.vllm import (
    IS_MODES, VLLMConfig, VLLMRolloutEngine, build_llm_kwargs, build_sampling_kwargs, is_correction,
    parse_request_outputs, vllm_weight_name,
)


def test_llm_kwargs_colocated_and_logprobs_mode():
    cfg = VLLMConfig(model="/ckpt", colocate=True, tensor_parallel_size=2, enable_sleep_mode=True,
                     max_model_len=9216, seed=5, extra=(("max_num_seqs", 64),))
    kw = build_llm_kwargs(cfg, "0.10.2", rank=3)
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["seed"] == 5 + 3 // 2          # ranks 2 and 3 form one TP group: same seed
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert kw["enable_sleep_mode"] is True and kw["max_model_len"] == 9216 and kw["max_num_seqs"] == 64
    assert kw["tokenizer"] == "/ckpt"
    # older vLLM: no logprobs_mode; unknown engine args are dropped (with a warning)
    assert "logprobs_mode" not in build_llm_kwargs(cfg, "0.9.2")
    with pytest.warns(UserWarning, match="logprobs_mode"):
        kw2 = build_llm_kwargs(cfg, "0.10.2", engine_arg_names=["dtype", "seed", "tensor_parallel_size"])
    assert set(kw2) == {"model", "tokenizer", "dtype", "seed", "tensor_parallel_size"}
    plain = build_llm_kwargs(VLLMConfig(model="m"), "0.11.0")
    assert "distributed_executor_backend" not in plain and plain["seed"] == 0


def test_config_validation():
    for bad in (dict(model=""), dict(model="m", tensor_parallel_size=0), dict(model="m", gpu_memory_utilization=0),
                dict(model="m", sleep_level=3), dict(model="m", weight_sync_chunk=0)):
        with pytest.raises(ValueError):
            VLLMConfig(**bad)


def test_sampling_kwargs():
    kw = build_sampling_kwargs(SamplingConfig(n=8, temperature=0.7, top_p=0.9, max_new_tokens=100, seed=3,
                                              stop_token_ids=(7, 9)))
    assert kw == dict(n=8, temperature=0.7, top_p=0.9, max_tokens=100, seed=3, stop_token_ids=[7, 9], logprobs=0)
    kw = build_sampling_kwargs(SamplingConfig(top_k=20), return_logprobs=False)
    assert kw["top_k"] == 20 and "logprobs" not in kw and "seed" not in kw
    with pytest.raises(TypeError):
        build_sampling_kwargs({"n": 2})


def _fake_output(prompt, completions):
    outs = []
    for ids, lps, reason in completions:
        logprobs = None if lps is None else [
            {tid: SimpleNamespace(logprob=lp, rank=1), tid + 1: SimpleNamespace(logprob=-9.0, rank=2)}
            for tid, lp in zip(ids, lps)]
        outs.append(SimpleNamespace(token_ids=tuple(ids), logprobs=logprobs, finish_reason=reason,
                                    stop_reason=None, text="t" * len(ids)))
    return SimpleNamespace(prompt_token_ids=prompt, outputs=outs)


def test_parse_request_outputs():
    g = torch.Generator().manual_seed(0)
    prompts = [[1, 2, 3], [4, 5]]
    comps = []
    for _ in prompts:
        c = []
        for j in range(3):
            n = int(torch.randint(1, 6, (1,), generator=g))
            ids = torch.randint(10, 100, (n,), generator=g).tolist()
            lps = (-torch.rand(n, generator=g)).tolist()
            c.append((ids, lps, "length" if j == 1 else "stop"))
        comps.append(c)
    outs = [_fake_output(p, c) for p, c in zip(prompts, comps)]
    rolls = parse_request_outputs(outs, prompts)
    assert [len(r) for r in rolls] == [3, 3]
    for p, c, rs in zip(prompts, comps, rolls):
        for (ids, lps, reason), r in zip(c, rs):
            assert r.prompt_ids == p and r.completion_ids == ids
            assert r.logprobs == pytest.approx(lps)
            assert r.truncated == (reason == "length")
            assert r.extra["finish_reason"] == reason and r.text == "t" * len(ids)
    with pytest.raises(ValueError):
        parse_request_outputs(outs[:1], prompts)
    with pytest.raises(ValueError, match="no log-probs"):
        parse_request_outputs([_fake_output([1], [([5], None, "stop")])], [[1]])
    assert parse_request_outputs([_fake_output([1], [([5], None, "stop")])], [[1]], with_logprobs=False)[0][0].logprobs is None


@pytest.mark.parametrize("name,want", [
    ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("_orig_mod.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
    ("model.layers.3._checkpoint_wrapped_module.self_attn.o_proj.weight", "model.layers.3.self_attn.o_proj.weight"),
    ("module._orig_mod.model.norm.weight", "model.norm.weight"),
    ("_fsdp_wrapped_module.model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.1.mlp.module.weight", "model.layers.1.mlp.module.weight"),   # a real submodule named module
])
def test_weight_names(name, want):
    assert vllm_weight_name(name) == want


def test_weight_names_custom_prefix():
    assert vllm_weight_name("base_model.model.model.norm.weight", ["base_model.model."]) == "model.norm.weight"


def _reference_is(t, s, m, mode, cap):
    """Loop reference: TRL's definition written out per sequence."""
    B, T = t.shape
    w = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        seq = sum(float(t[b, j] - s[b, j]) for j in range(T) if m[b, j])
        for j in range(T):
            if not m[b, j]:
                continue
            r = math.exp(seq) if mode.startswith("sequence") else math.exp(float(t[b, j] - s[b, j]))
            w[b, j] = min(r, cap) if mode.endswith("truncate") else (r if r <= cap else 0.0)
    return w


@pytest.mark.parametrize("mode", IS_MODES)
def test_is_correction_matches_reference(mode):
    g = torch.Generator().manual_seed(1)
    B, T, cap = 5, 7, 1.5
    s = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    t = s + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    m = torch.rand(B, T, generator=g) > 0.25
    w = is_correction(t, s, m, mode=mode, cap=cap)
    ref = _reference_is(t, s, m, mode, cap)
    assert torch.allclose(w.double(), ref, rtol=1e-5, atol=1e-6)
    # mixes capped, masked and passed-through tokens, so the test can tell the modes apart
    if mode == "token_truncate":
        assert (w == cap).any() and ((w > 0) & (w < cap)).any()
    # packed layout with seq_ids gives the same weights
    flat = is_correction(t[m], s[m], torch.ones(int(m.sum()), dtype=torch.bool),
                         seq_ids=torch.arange(B).unsqueeze(1).expand(B, T)[m] * 10 + 3, mode=mode, cap=cap)
    assert torch.allclose(flat.double(), ref[m], rtol=1e-5, atol=1e-6)


def test_is_correction_no_grad_and_errors():
    t = torch.randn(2, 3, requires_grad=True)
    w = is_correction(t, torch.randn(2, 3), torch.ones(2, 3))
    assert not w.requires_grad
    huge = is_correction(torch.full((1, 2), 500.0), torch.zeros(1, 2), torch.ones(1, 2), mode="sequence_mask")
    assert torch.isfinite(huge).all() and (huge == 0).all()
    with pytest.raises(ValueError):
        is_correction(t, torch.randn(2, 3), torch.ones(2, 3), mode="token")
    with pytest.raises(ValueError):
        is_correction(t, torch.randn(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError):
        is_correction(t, torch.randn(2, 3), torch.ones(2, 3), cap=0)


def test_without_vllm_the_engine_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)      # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install fastupg\[vllm\]"):
        VLLMRolloutEngine(VLLMConfig(model="m"))


_HAS_VLLM = importlib.util.find_spec("vllm") is not None
_SKIP = ("vLLM is not installed (pip install fastupg[vllm])" if not _HAS_VLLM
         else None if torch.cuda.is_available() else "vLLM needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
def test_vllm_engine_end_to_end(tmp_path):
    """Tiny model: generate with log-probs, truncation flag, weight sync changes the samples."""
    from fastupg.task.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_model(tmp_path / "m", tok, size="micro")
    eng = VLLMRolloutEngine(VLLMConfig(model=str(tmp_path / "m"), gpu_memory_utilization=0.2, max_model_len=256,
                                       enforce_eager=True, enable_sleep_mode=True), tok)
    prompts = [tok("abc", add_special_tokens=False)["input_ids"], tok("hello", add_special_tokens=False)["input_ids"]]
    sc = SamplingConfig(n=3, temperature=0.7, max_new_tokens=5, seed=0)
    out = eng.generate(prompts, sc)
    assert [len(o) for o in out] == [3, 3]
    for r in out[0]:
        assert len(r.logprobs) == len(r.completion_ids) and all(lp <= 0 for lp in r.logprobs)
        assert r.truncated == (len(r.completion_ids) == 5 and r.completion_ids[-1] != tok.eos_token_id)
    eng.sleep()
    eng.wake_up()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0).add_(torch.randn_like(p))
    eng.sync_weights((n, p) for n, p in model.state_dict().items())
    out2 = eng.generate(prompts, sc)
    assert [r.completion_ids for r in out2[0]] != [r.completion_ids for r in out[0]]


class _FakeLLM:
    """Records what the engine asks of vllm.LLM; answers generate with scripted outputs."""

    def __init__(self, direct=True):
        self.loaded, self.calls = [], []
        if direct:
            model = SimpleNamespace(load_weights=lambda w: self.loaded.append(list(w)))
            self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
                driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model))))

    def reset_prefix_cache(self):
        self.calls.append("reset")

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake", tags))

    def generate(self, requests, sampling_params, use_tqdm):
        self.calls.append(("generate", sampling_params))
        return [_fake_output(r["prompt_token_ids"], [([7] * (1 + j), [-0.5] * (1 + j), "stop")
                                                     for j in range(sampling_params["n"])]) for r in requests]


class _RPCOnlyLLM(_FakeLLM):
    def __init__(self):
        super().__init__(direct=False)

    def collective_rpc(self, fn, args=()):
        worker = SimpleNamespace(model_runner=SimpleNamespace(
            model=SimpleNamespace(load_weights=lambda w: self.loaded.append(list(w)))))
        return [fn(worker, *args)]


def _engine(llm, **cfg):
    eng = object.__new__(VLLMRolloutEngine)       # skip __init__: no vLLM here
    eng.cfg, eng.llm, eng.tokenizer = VLLMConfig(model="m", **cfg), llm, None
    eng.rank, eng.world, eng._tp_group, eng._asleep = 0, 1, None, False
    eng._sampling_cls = dict
    return eng


@pytest.mark.parametrize("llm_cls", [_FakeLLM, _RPCOnlyLLM])
def test_sync_weights_maps_names_chunks_and_resets_cache(llm_cls):
    llm = llm_cls()
    eng = _engine(llm, weight_sync_chunk=2)
    g = torch.Generator().manual_seed(0)
    named = [("_orig_mod.model.embed_tokens.weight", torch.randn(4, 3, generator=g)),
             ("model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight", torch.randn(5, 3, generator=g)),
             ("lm_head.weight", torch.randn(4, 3, generator=g))]
    eng.sync_weights(iter(named))
    assert [len(b) for b in llm.loaded] == [2, 1]
    got = [n for b in llm.loaded for n, _ in b]
    assert got == ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    assert all(torch.equal(a, t) for (_, a), (_, t) in zip([x for b in llm.loaded for x in b], named))
    assert llm.calls[-1] == "reset"
    with pytest.raises(TypeError):
        eng.sync_weights([("x", [1.0])])


def test_sleep_wake_state_and_generate_with_a_fake_llm():
    llm = _FakeLLM()
    eng = _engine(llm, enable_sleep_mode=True, sleep_level=2)
    eng.sleep()
    eng.sleep()                                   # idempotent
    with pytest.raises(RuntimeError, match="asleep"):
        eng.generate([[1, 2]], SamplingConfig(n=2))
    eng.wake_up(tags=["weights"])                 # weights only: still asleep for generation
    assert eng._asleep
    eng.wake_up(tags=["kv_cache"])
    assert not eng._asleep
    assert llm.calls == [("sleep", 2), ("wake", ["weights"]), ("wake", ["kv_cache"])]
    out = eng.generate([[1, 2], [3]], SamplingConfig(n=2, max_new_tokens=9, temperature=0.8))
    assert [[len(r.completion_ids) for r in o] for o in out] == [[1, 2], [1, 2]]
    assert out[1][1].logprobs == [-0.5, -0.5] and out[1][0].prompt_ids == [3]
    sp = llm.calls[-1][1]
    assert sp["max_tokens"] == 9 and sp["temperature"] == 0.8 and sp["logprobs"] == 0
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[]], SamplingConfig())
    # without sleep mode, sleep/wake are no-ops
    llm2 = _FakeLLM()
    eng2 = _engine(llm2)
    eng2.sleep()
    eng2.wake_up()
    assert llm2.calls == []


def test_iter_full_state_plain_module_feeds_sync():
    from fastupg.rollout.vllm import iter_full_state

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    got = dict(iter_full_state(m))
    assert list(got) == list(m.state_dict()) and all(torch.equal(got[k], v) for k, v in m.state_dict().items())
    llm = _FakeLLM()
    _engine(llm).sync_weights(iter_full_state(m))
    assert [n for b in llm.loaded for n, _ in b] == list(m.state_dict())
