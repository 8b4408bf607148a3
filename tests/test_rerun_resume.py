"""Nothing silently wrong when a run meets an earlier one (issue 15, items 2 and 4): a run into a folder holding a
previous run continues it (resume=true) or replaces it (overwrite_output_dir=true), else it is refused before any
work; the printed final checkpoint always exists; resume never logs a step twice; a changed learning-rate schedule
on resume is refused, other changed settings are printed."""
import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
import torch

from fastupg import checkpoint as ckpt
from fastupg import distributed as D
from fastupg import trainer as T
from fastupg.config import TrainConfig
from fastupg.metrics import RunLogger, read_jsonl

EMB = str(Path(tempfile.gettempdir()) / "fastupg-test-emb")


def make_cfg(out, **kw) -> TrainConfig:
    base = dict(model="embedded", model_size="micro", embedded_dir=EMB, loss_type="sft", num_generations=2,
                per_device_train_batch_size=2, max_completion_length=24, max_steps=2, learning_rate=1e-3,
                report_to=("jsonl",), plot=False, progress_bar=False, save_steps=0, output_dir=str(out), seed=1,
                max_tokens_per_microbatch=256)
    base.update(kw)
    return TrainConfig(**base)


def _steps(out):
    return [r["step"] for r in read_jsonl(Path(out) / "metrics.jsonl")]


def test_rerun_into_a_used_output_dir_is_refused_before_any_work(tmp_path, monkeypatch):
    T.train(make_cfg(tmp_path / "r"), log=lambda *a: None)
    built = []
    monkeypatch.setattr(T, "resolve_paths", lambda *a, **k: built.append(1))
    with pytest.raises(ValueError, match="resume=true.*overwrite_output_dir=true"):
        T.train(make_cfg(tmp_path / "r"), log=lambda *a: None)
    assert not built                                          # refused before the model/data were touched
    # files that are not a previous run's output (e.g. a config.yaml written by a script) do not count
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.yaml").write_text("x: 1\n")
    ckpt.check_output_dir(tmp_path / "fresh", False, False)


def test_overwrite_output_dir_replaces_the_previous_run_and_the_final_checkpoint_exists(tmp_path):
    out = tmp_path / "rerun"
    T.train(make_cfg(out, max_steps=4, save_steps=2, save_total_limit=2), log=lambda *a: None)
    assert [n for n, _ in ckpt.list_checkpoints(out)] == [2, 4] and _steps(out) == [1, 2, 3, 4]
    lines = []
    summary = T.train(make_cfg(out, max_steps=1, save_total_limit=2, overwrite_output_dir=True), log=lines.append)
    final = Path(summary["final_checkpoint"])
    assert final.name == "checkpoint-1" and (final / ckpt.MARKER).is_file()
    assert f"[fastupg] final checkpoint: {final}" in lines
    assert [n for n, _ in ckpt.list_checkpoints(out)] == [1]   # the old run's checkpoint-2/4 are gone
    assert _steps(out) == [1]                                  # and so are its metrics


def test_save_total_limit_never_deletes_the_checkpoint_just_saved(tmp_path):
    """Even when older, higher-numbered checkpoints are in the folder (the rotation ranks by step)."""
    for n in (20, 40):
        (tmp_path / f"checkpoint-{n}").mkdir()
        (tmp_path / f"checkpoint-{n}" / ckpt.MARKER).write_text("ok\n")

    class Stub(torch.nn.Linear):
        def save_pretrained(self, path, state_dict=None, safe_serialization=True):
            torch.save(state_dict, Path(path) / "w.pt")

    m = Stub(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    final = ckpt.save_checkpoint(tmp_path, 3, m, None, opt, sched, {"step": 3}, D.DistInfo(), save_total_limit=2)
    assert final.is_dir() and (final / ckpt.MARKER).is_file()
    assert [n for n, _ in ckpt.list_checkpoints(tmp_path)] == [3, 40]


def test_resume_after_a_crash_logs_no_step_twice(tmp_path):
    out = tmp_path / "crash"
    cfg = make_cfg(out, max_steps=4, save_steps=2, save_total_limit=None)
    tr = T.Trainer(cfg, D.DistInfo(), log=lambda *a: None)
    real = tr.train_step

    def step():
        if tr.step == 3:                     # steps 1-3 logged, checkpoint-2 saved: then the machine dies
            raise RuntimeError("node lost")
        return real()
    tr.train_step = step
    with pytest.raises(RuntimeError):
        tr.fit()
    tr.logger.close()
    assert _steps(out) == [1, 2, 3] and ckpt.latest_checkpoint(out).name == "checkpoint-2"
    summary = T.train(dataclasses.replace(cfg, resume=True), log=lambda *a: None)
    assert summary["step"] == 4
    assert _steps(out) == [1, 2, 3, 4]                         # not 1, 2, 3, 3, 4
    assert [r["step"] for r in summary["history"]] == [1, 2, 3, 4]


def test_resume_hides_later_tensorboard_steps(tmp_path, monkeypatch):
    seen = {}

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            seen["purge_step"] = purge_step

        def close(self):
            pass
    import torch.utils.tensorboard as tb
    monkeypatch.setattr(tb, "SummaryWriter", FakeWriter)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(6)))
    RunLogger(tmp_path, ("jsonl", "tensorboard"), console=None, resume_step=3).close()
    assert seen["purge_step"] == 4 and _steps(tmp_path) == [0, 1, 2, 3]
    RunLogger(tmp_path, ("jsonl", "tensorboard"), console=None).close()   # a fresh run starts empty
    assert seen["purge_step"] == 0 and _steps(tmp_path) == []


def _fake_checkpoint(out, step, cfg):
    d = Path(out) / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / ckpt.MARKER).write_text("ok\n")
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "config": cfg.to_dict()}))
    return d


def test_a_changed_schedule_on_resume_is_refused(tmp_path):
    old = make_cfg(tmp_path, max_steps=40, lr_scheduler_type="cosine", warmup_steps=2)
    path = _fake_checkpoint(tmp_path, 20, old)
    assert ckpt.check_resume(dataclasses.replace(old, resume=True), path, T.lr_lambda) == []
    with pytest.raises(ValueError, match="schedule.*max_steps 40 -> 60.*step 21"):
        ckpt.check_resume(dataclasses.replace(old, max_steps=60), path, T.lr_lambda)
    with pytest.raises(ValueError, match="learning_rate"):
        ckpt.check_resume(dataclasses.replace(old, learning_rate=2e-3), path, T.lr_lambda)
    with pytest.raises(ValueError, match="past max_steps=10"):
        ckpt.check_resume(dataclasses.replace(old, max_steps=10), path, T.lr_lambda)


def test_a_longer_constant_schedule_on_resume_is_stated(tmp_path):
    old = make_cfg(tmp_path, max_steps=40, lr_scheduler_type="constant", warmup_steps=2)
    path = _fake_checkpoint(tmp_path, 40, old)
    notes = ckpt.check_resume(dataclasses.replace(old, max_steps=60, per_device_train_batch_size=4), path,
                              T.lr_lambda)
    assert len(notes) == 1 and "max_steps 40 -> 60" in notes[0] and "per_device_train_batch_size 2 -> 4" in notes[0]
    assert "nothing left to train" in ckpt.check_resume(old, path, T.lr_lambda)[0]


def test_resume_refuses_before_loading_anything(tmp_path, monkeypatch):
    """Through the Trainer: a Ctrl-C'd cosine run resumed with another max_steps stops before any model load."""
    out = tmp_path / "r"
    cfg = make_cfg(out, max_steps=3, lr_scheduler_type="cosine")
    tr = T.Trainer(cfg, D.DistInfo(), log=lambda *a: None)
    real = tr.train_step

    def step():
        if tr.step == 1:
            raise KeyboardInterrupt
        return real()
    tr.train_step = step
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    loads = []
    monkeypatch.setattr(T, "load_model", lambda *a, **k: loads.append(1))
    with pytest.raises(ValueError, match="schedule"):
        T.Trainer(dataclasses.replace(cfg, resume=True, max_steps=6), D.DistInfo(), log=lambda *a: None)
    assert not loads


def test_resume_from_an_older_checkpoint_beside_later_ones_is_refused(tmp_path):
    cfg = make_cfg(tmp_path)
    _fake_checkpoint(tmp_path, 20, cfg)
    _fake_checkpoint(tmp_path, 40, cfg)
    with pytest.raises(ValueError, match="later checkpoints.*checkpoint-40"):
        ckpt.resolve_resume(str(tmp_path / "checkpoint-20"), tmp_path)
    assert ckpt.resolve_resume(True, tmp_path).name == "checkpoint-40"
