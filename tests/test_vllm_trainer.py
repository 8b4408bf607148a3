"""The trainer's vLLM path: staged sleep/wake around the in-place sync, the truncated importance-sampling
correction, one seed per TP group, the context check; then the CLI end to end against the real vLLM
CPU build (`fastupg train --config configs/demo.yaml rollout_engine=vllm`, `fastupg eval --engine vllm`).

The first tests use a stand-in engine (HF generate behind it, log-probs shifted on purpose); the last two
run the CLI in a subprocess each (one vllm.LLM apiece: vLLM binds the CPU threads of the process it runs in).
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from fastupg import distributed as D
from fastupg import trainer as T
from fastupg.config import TrainConfig, fit_model_positions
from fastupg.rollout.base import Rollout

REPO = Path(__file__).resolve().parent.parent
EMB = str(Path(tempfile.gettempdir()) / "fastupg-test-emb")


def make_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(model="embedded", model_size="micro", embedded_dir=EMB, num_generations=2, loss_type="grpo",
                per_device_train_batch_size=4, max_completion_length=12, max_steps=2, learning_rate=1e-3,
                report_to=(), plot=False, progress_bar=False, save_steps=0, output_dir=str(tmp_path / "run"),
                max_tokens_per_microbatch=256, seed=3, rollout_engine="vllm")
    base.update(kw)
    return TrainConfig(**base)


class StandIn:
    """Plays vllm: HF generate on a copy of the model, log-probs shifted by `shift`; records the calls."""

    def __init__(self, shift=0.0):
        self.shift, self.calls, self.hf, self.synced = shift, [], None, []

    def generate(self, prompts, sampling):
        self.calls.append("generate")
        out = self.hf.generate(prompts, sampling)
        return [[Rollout(r.prompt_ids, r.completion_ids, [lp - self.shift for lp in r.logprobs], r.truncated, r.text)
                 for r in rolls] for rolls in out]

    def sync_weights(self, named):
        self.synced = [n for n, _ in named]
        self.calls.append("sync")

    def sleep(self):
        self.calls.append("sleep")

    def wake_up(self, tags=None):
        self.calls.append(("wake", tags))


def _trainer(tmp_path, monkeypatch, shift=0.0, **kw):
    stand_in = StandIn(shift)
    monkeypatch.setattr(T, "make_vllm_engine", lambda *a, **k: stand_in)
    tr = T.Trainer(make_cfg(tmp_path, **kw), D.DistInfo())
    from fastupg.rollout.hf import HFRolloutEngine
    stand_in.hf = HFRolloutEngine(tr.model, tr.tokenizer)
    tr.score = lambda texts, golds: [float(i % 2) for i in range(len(texts))]   # one success per group
    return tr, stand_in


def test_staged_wake_around_the_sync_every_step(tmp_path, monkeypatch):
    tr, eng = _trainer(tmp_path, monkeypatch)
    tr.fit()
    step = ["generate", "sleep", ("wake", ["weights"]), "sync", ("wake", ["kv_cache"])]
    assert eng.calls == step * 2
    assert eng.synced == list(tr.model.state_dict())             # the full state ...
    assert "lm_head.weight" in eng.synced and tr.model.config.tie_word_embeddings   # ... the tied head included


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """step(shift, **cfg overrides): one train_step from the same initial weights, prompts and RNG state;
    one trainer for all (building one costs more than a step)."""
    import dataclasses

    mp = pytest.MonkeyPatch()
    tr, eng = _trainer(tmp_path_factory.mktemp("is"), mp, max_steps=1)
    mp.undo()
    model0 = {k: v.clone() for k, v in tr.model.state_dict().items()}
    opt0, base = tr.opt.state_dict(), tr.cfg

    def step(shift, **kw):
        tr.cfg = tr.loss.cfg = dataclasses.replace(base, **kw)   # the trainer's and its loss passes' settings
        tr.use_is_correction = tr.cfg.vllm_importance_sampling_correction
        tr.model.load_state_dict(model0)
        tr.opt.load_state_dict(opt0)
        tr.data_pos, eng.shift = 0, shift
        torch.manual_seed(0)
        return tr.train_step()
    return step


def test_truncated_is_caps_the_ratio_and_scales_the_gradient(one_step):
    """Engine log-probs 50 nats below the trainer's: every token's ratio e^50 is truncated to the cap,
    so the gradient (norm before clipping) is exactly cap x the uncorrected one; in sequence_mask mode every
    sequence is dropped."""
    off = one_step(50.0, vllm_importance_sampling_correction=False)
    assert not any(k.startswith("sampling/") for k in off) and off["grad_norm"] > 0
    on = one_step(50.0)                                                   # defaults: token_truncate, cap 2
    assert on["sampling/importance_sampling_ratio/mean"] == pytest.approx(2.0)
    assert on["sampling/importance_sampling_ratio/clipped_fraction"] == 1.0
    assert on["sampling/sampling_logp_difference/mean"] == pytest.approx(50.0, rel=1e-4)
    assert on["grad_norm"] == pytest.approx(2.0 * off["grad_norm"], rel=1e-4)
    cap3 = one_step(50.0, vllm_importance_sampling_mode="sequence_truncate", vllm_importance_sampling_clip_max=3.0)
    assert cap3["grad_norm"] == pytest.approx(3.0 * off["grad_norm"], rel=1e-4)
    masked = one_step(50.0, vllm_importance_sampling_mode="sequence_mask")
    assert masked["grad_norm"] == 0 and masked["sampling/importance_sampling_ratio/mean"] == 0


def test_matching_logprobs_give_ratio_one(one_step):
    m = one_step(0.0)                           # HF generate's own log-probs: the same model
    assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-4)
    assert m["sampling/importance_sampling_ratio/clipped_fraction"] == 0


def test_hf_engine_skips_the_correction(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the HF engine samples with the trainer's model: no correction to compute")

    import fastupg.step_loss as SL
    monkeypatch.setattr(SL, "is_correction", boom)
    tr = T.Trainer(make_cfg(tmp_path, rollout_engine="hf", max_steps=1), D.DistInfo())
    m = tr.train_step()
    assert not any(k.startswith("sampling/") for k in m)


def test_make_vllm_engine_one_seed_per_tp_group_and_context(tmp_path, monkeypatch):
    import fastupg.rollout.vllm as V

    seen = []
    monkeypatch.setattr(V, "VLLMRolloutEngine", lambda cfg, tok=None: seen.append(cfg))
    cfg = make_cfg(tmp_path, vllm_tensor_parallel_size=2, seed=7)
    for rank in range(4):
        T.make_vllm_engine(cfg, "/ckpt", D.DistInfo(rank=rank, world_size=4, local_rank=rank))
    # the run's seed for every rank; the engine derives one per TP group (seed + rank // tp)
    assert [c.seed for c in seen] == [7] * 4
    assert [V.build_llm_kwargs(c, rank=r)["seed"] for r, c in enumerate(seen)] == [7, 7, 8, 8]
    assert seen[0].max_model_len == cfg.max_prompt_length + cfg.max_completion_length <= 512


def test_context_must_fit_the_model_positions(tmp_path, monkeypatch):
    # the demo's own numbers used to ask for 512 + 40 positions of a 512-position model
    demo = dict(model="embedded", max_completion_length=40)
    assert TrainConfig(**demo).max_prompt_length == 472                   # None: what fits
    with pytest.raises(ValueError, match="max_prompt_length.*max_completion_length.*512 positions"):
        TrainConfig(**demo, max_prompt_length=512)
    with pytest.raises(ValueError, match="no room"):
        TrainConfig(model="embedded", max_completion_length=512)
    r = subprocess.run([sys.executable, "-m", "fastupg", "train", "--config", "configs/demo.yaml",
                        "max_prompt_length=512"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "exceeds the 512 positions" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a checkpoint: its config.json decides, before any weights are read
    from fastupg.task.tiny import build_tiny_model, build_tokenizer
    ck = tmp_path / "ck"
    build_tiny_model(ck, build_tokenizer(), size="micro")
    cfg = TrainConfig(model=str(ck), train_file="x.jsonl", max_completion_length=500, output_dir=str(tmp_path / "o"))
    assert fit_model_positions(cfg).max_prompt_length == 12
    bad = TrainConfig(model=str(ck), train_file="x.jsonl", max_prompt_length=100, max_completion_length=500)
    monkeypatch.setattr(T, "load_model", lambda *a, **k: pytest.fail("loaded the model before the check"))
    with pytest.raises(ValueError, match="600 exceeds the 512 positions"):
        T.Trainer(bad, D.DistInfo())


# ----------------------------------------------------------------------------------------------
# the real vLLM (CPU build), through the CLI
# ----------------------------------------------------------------------------------------------
def _fastupg(*argv, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "fastupg", *argv], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_demo_trains_three_steps_with_real_vllm(tmp_path):
    """The demo recipe with rollout_engine=vllm and nothing engine-specific (the overrides keep the test's
    files in tmp and its held-out evaluation short). The demo's base solves some prompts and fails others
    (docs/embedded_task.md), so each step routes some prompts to RL on vLLM's rollouts (their tokens reach the
    loss through the truncated importance-sampling correction, whose metrics are logged) and some to SFT."""
    out = tmp_path / "run"
    r = _fastupg("train", "--config", "configs/demo.yaml", "rollout_engine=vllm", "max_steps=3",
                 f"output_dir={out}", f"embedded_dir={EMB}", "eval_samples=16", "progress_bar=false",
                 "report_to=jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in rows if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert m["completions/mean_length"] > 0 and 0 <= m["completions/clipped_ratio"] <= 1
        assert 0.0 <= m["hpt/sft_fraction"] <= 1.0
    assert any(m["hpt/sft_fraction"] < 1.0 for m in steps)        # rollouts reached the loss
    ratios = [m["sampling/importance_sampling_ratio/mean"] for m in steps if m["hpt/sft_fraction"] < 1.0]
    assert ratios and all(0.9 < x < 1.1 for x in ratios), ratios   # same weights, fp32 on both sides
    assert any("eval/accuracy" in m for m in rows)
    assert (out / "checkpoint-3").is_dir() or any(out.glob("checkpoint-*"))


def test_grpo_with_real_vllm_is_ratio_one_after_each_sync(tmp_path):
    """GRPO trains on the rollouts: the IS correction sees vLLM's processed log-probs against the trainer's
    fp32 recomputation. Ratio ~1 and no clipping at step 2 too: the weights were synced in place after step 1
    (stale weights would put the log-probs apart by far more than 1e-4)."""
    out = tmp_path / "run"
    r = _fastupg("train", "--config", "configs/demo.yaml", "rollout_engine=vllm", "loss_type=grpo", "max_steps=2",
                 "per_device_train_batch_size=16", "learning_rate=3e-2", "warmup_steps=0", "eval_steps=0",
                 "entropy_coef=0.01",   # a gradient even when every reward is 0 (untrained model): the weights move
                 f"output_dir={out}", f"embedded_dir={EMB}", "progress_bar=false", "report_to=jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-3)
        assert m["sampling/importance_sampling_ratio/clipped_fraction"] == 0
        assert m["sampling/sampling_logp_difference/mean"] < 1e-4
    assert steps[0]["grad_norm"] > 0


def test_eval_with_real_vllm_on_the_held_out_split(tmp_path):
    emb = next(Path(EMB).glob("seed0-tiny-*"), None) if Path(EMB).is_dir() else None
    if emb is None:     # normally built by the demo test above; build it when this test runs alone
        from fastupg.task import ArithConfig
        from fastupg.task.tiny import ensure_embedded
        emb = ensure_embedded(tmp_path / "emb", seed=0, size="tiny", task=ArithConfig(seed=0))
    model, data = emb / "model", emb / "data" / "eval.jsonl"
    too_long = _fastupg("eval", "--engine", "vllm", "--model", str(model), "--data", str(data), "--out",
                        str(tmp_path / "x"), "--limit", "4", "--no-progress")          # default 8192 new tokens
    assert too_long.returncode == 2 and "max_position_embeddings=512" in too_long.stderr
    r = _fastupg("eval", "--engine", "vllm", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "ev"),
                 "--limit", "12", "--k", "2", "--max-new-tokens", "24", "--system-prompt", "none", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["engine"] == "vllm"
    (b,) = res["benchmarks"].values()
    assert b["questions"] == 12 and b["k"] == 2 and 0 < b["mean_response_tokens"] <= 24
    lines = (tmp_path / "ev" / "responses").glob("*.jsonl")
    assert sum(len(p.read_text().splitlines()) for p in lines) == 24
