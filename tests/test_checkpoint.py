"""Checkpoints: 2k steps == k steps + Ctrl-C (checkpoint) + resume + k steps, bit for bit; half-written
checkpoints are never picked up."""
import tempfile
from pathlib import Path

import pytest
import torch

from fastupg import checkpoint as ckpt
from fastupg import distributed as D
from fastupg import trainer as T
from fastupg.config import TrainConfig

EMB = str(Path(tempfile.gettempdir()) / "fastupg-test-emb")


def make_cfg(out, **kw) -> TrainConfig:
    base = dict(model="embedded", model_size="micro", embedded_dir=EMB, loss_type="hpt", hpt_mode="soft",
                num_generations=2, per_device_train_batch_size=4, max_completion_length=24, max_steps=4,
                learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=1, report_to=("jsonl",), plot=False,
                progress_bar=False, save_steps=0, output_dir=str(out), seed=5)
    base.update(kw)
    return TrainConfig(**base)


def _score(texts, golds):
    return [float(len(t) % 2) for t in texts]   # depends on the sampled text: a resumed RNG must match


def _run(cfg, stop_at=None):
    tr = T.Trainer(cfg, D.DistInfo())
    tr.score = _score
    if stop_at is not None:
        real = tr.train_step

        def step():
            if tr.step == stop_at:
                raise KeyboardInterrupt
            return real()
        tr.train_step = step
    return tr, tr.fit()


def test_resume_is_exact(tmp_path):
    full, out_full = _run(make_cfg(tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):
        _run(make_cfg(tmp_path / "split"), stop_at=2)           # Ctrl-C after 2 steps saves checkpoint-2
    assert ckpt.latest_checkpoint(tmp_path / "split").name == "checkpoint-2"
    resumed, out = _run(make_cfg(tmp_path / "split", resume=True))
    assert out["step"] == 4
    a = dict(full.model.named_parameters())
    b = dict(resumed.model.named_parameters())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert [r["step"] for r in out["history"]] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in out["history"]]),
                               torch.tensor([r["loss"] for r in out_full["history"]]), rtol=0, atol=0)
    # the final checkpoint loads like any HF model
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(out["final_checkpoint"])
    torch.testing.assert_close(dict(m.named_parameters())["model.norm.weight"], b["model.norm.weight"])


def test_incomplete_checkpoints_are_ignored(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()                          # no COMPLETE marker: a crash mid-save
    (tmp_path / ".tmp-checkpoint-5").mkdir()
    good = tmp_path / "checkpoint-2"
    good.mkdir()
    (good / ckpt.MARKER).write_text("ok")
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.resolve_resume(True, tmp_path) == good
    assert ckpt.resolve_resume(False, tmp_path) is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "checkpoint-3"), tmp_path)


def test_save_total_limit_and_atomic_layout(tmp_path):
    cfg = make_cfg(tmp_path / "r", max_steps=3, save_steps=1, save_total_limit=2, loss_type="sft", hpt_mode="switch")
    _run(cfg)
    names = sorted(p.name for p in (tmp_path / "r").iterdir() if p.name.startswith(("checkpoint", ".tmp")))
    assert names == ["checkpoint-2", "checkpoint-3"]
    last = tmp_path / "r" / "checkpoint-3"
    for f in ("config.json", "model.safetensors", "trainer_state.pt", "rng-0.pt", ckpt.MARKER):
        assert (last / f).is_file(), f
