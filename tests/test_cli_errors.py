"""Every CLI error a new user runs into is ONE clear line on stderr and exit code 2, before any heavy work
(issue 15 item 5). Nothing is trained or loaded here: the heavy entry points are replaced by tripwires."""
import json
import sys
from pathlib import Path

import pytest

from fastupg import cli

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "configs" / "demo.yaml")


@pytest.fixture
def tripwires(monkeypatch):
    """Fail the test if training, distributed init or the embedded model build starts."""
    def boom(*a, **k):
        raise AssertionError("heavy work started despite a bad command line")
    import fastupg.distributed
    import fastupg.task.tiny
    import fastupg.trainer
    monkeypatch.setattr(fastupg.trainer, "train", boom)
    monkeypatch.setattr(fastupg.distributed, "init", boom)
    monkeypatch.setattr(fastupg.task.tiny, "ensure_embedded", boom)


def _one_line_exit_2(capsys, argv, *needles):
    try:
        rc = cli.main(argv)
    except SystemExit as e:             # argparse's own errors exit from inside parse_args
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv,needles", [
    (["train", "--config", DEMO, "model=/nonexistent/path"], ["model", "/nonexistent/path", "no such folder"]),
    (["train", "--config", str(REPO / "README.md")], ["README.md", "not a YAML recipe"]),
    (["train", "--config", DEMO, "resume=maybe"], ["resume", "maybe", "resume=true"]),
    (["train", "--config", DEMO, "model_size=huge"], ["model_size", "huge", "tiny"]),
    (["train", "--config", DEMO, "train_file=/nonexistent/train.jsonl"], ["train_file", "no such file"]),
    (["train"], ["--config", "configs/demo.yaml"]),                 # no silent 100-step default run
    (["train", "max_steps=5"], ["--config"]),
    (["train", "--config", DEMO, "--bogus"], ["--bogus"]),
    (["train", "--config", DEMO, "resume=true", "overwrite_output_dir=true"], ["contradict"]),
    # found while hunting for more of the same kind:
    (["train", "--config", DEMO, "output_dir=''"], ["output_dir", "empty"]),        # would write into the cwd
    (["train", "--config", str(REPO / "configs" / "sft-then-grpo.yaml"), "max_steps=5"],
     ["max_steps", "every stage"]),                                                  # was silently ignored
    (["train", "--config", DEMO, "model=Qwen/Qwen2.5-Math-7B"], ["train_file"]),    # was a traceback after D.init
    (["train", "--config", str(REPO / "configs" / "grpo.yaml"), "model=Qwen/Qwen2.5-Math-7B", "train_file=openr1"],
     ["eval_steps", "eval_file"]),                                                   # was no evaluation at all
])
def test_train_errors(capsys, tripwires, argv, needles):
    _one_line_exit_2(capsys, argv, *needles)


def test_vllm_missing_is_one_line(capsys, tripwires, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)        # as if vLLM failed to import
    _one_line_exit_2(capsys, ["train", "--config", DEMO, "rollout_engine=vllm"], "vLLM", "rollout_engine=hf")


def test_used_output_dir_is_one_line(capsys, tripwires, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    _one_line_exit_2(capsys, ["train", "--config", DEMO, f"output_dir={tmp_path}"], "overwrite_output_dir=true",
                     "resume=true")


def test_dashed_overrides_are_overrides():
    for argv in (["--max_steps=5"], ["--max_steps", "5"], ["--max-steps=5"], ["max_steps=5"]):
        cfg, show = cli.parse_train(["--config", DEMO, *argv, "--print-config"])
        assert cfg.max_steps == 5 and show, argv
    cfg, _ = cli.parse_train(["--config=" + DEMO, "--top_k", "-1", "--learning_rate=1e-4"])
    assert cfg.top_k == -1 and cfg.learning_rate == 1e-4


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "max_position_embeddings": 512}))
    return str(d)


@pytest.mark.parametrize("extra,needles", [
    (["--model", "/nonexistent/ckpt"], ["--model", "no such folder"]),
    (["--temperature", "0"], ["--temperature"]),
    (["--k", "0"], ["--k"]),
    (["--limit", "0"], ["--limit"]),
    (["--data", "/nonexistent/MATH-500.json"], ["--data", "no such file"]),
    (["--k", "two"], ["--k", "invalid int"]),                      # argparse's own error: one line too
    (["--max-new-tokens", "8192"], ["--max-new-tokens", "max_position_embeddings=512"]),  # the demo model
])
def test_eval_errors(capsys, monkeypatch, model_dir, extra, needles):
    import fastupg.evaluate as E

    def boom(*a, **k):
        raise AssertionError("evaluation started despite a bad command line")
    monkeypatch.setattr(E, "_make_engine", boom)
    monkeypatch.setattr(E, "_load_benchmarks", boom)
    base = {"--model": model_dir, "--data": "MATH-500", "--out": "/tmp/unused-eval-out"}
    for k, v in zip(extra[::2], extra[1::2]):
        base[k] = v
    argv = ["eval"] + [x for kv in base.items() for x in kv]
    _one_line_exit_2(capsys, argv, *needles)
