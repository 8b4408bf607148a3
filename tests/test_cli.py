"""CLI parsing: `fastupg train --config X key=value`, bad configs exit before any work, eval/bench wiring."""
import subprocess
import sys
from pathlib import Path

import pytest

from fastupg import cli

REPO = Path(__file__).resolve().parent.parent


def test_parse_train_with_overrides():
    cfg, show = cli.parse_train(["--config", str(REPO / "configs" / "grpo.yaml"), "learning_rate=2e-4",
                                 "max_steps=7", "--print-config"])
    assert show and cfg.loss_type == "grpo" and cfg.learning_rate == 2e-4 and cfg.max_steps == 7


def test_bad_config_exits_2_naming_the_key(capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("training started despite a bad config")
    import fastupg.trainer
    monkeypatch.setattr(fastupg.trainer, "train", boom)
    assert cli.main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "num_generatons=4"]) == 2
    err = capsys.readouterr().err
    assert "num_generatons" in err and "num_generations" in err


def test_print_config(capsys):
    assert cli.main(["train", "loss_type=sft", "--print-config"]) == 0
    assert '"loss_type": "sft"' in capsys.readouterr().out


def test_subcommands_parse():
    a = cli.parse_args(["eval", "--model", "m", "--data", "d", "--out", "o"])
    assert a.command == "eval" and a.rest == ["--model", "m", "--data", "d", "--out", "o"]
    a = cli.parse_args(["bench", "fused_linear", "--quick"])
    assert a.which == "fused_linear" and a.rest == ["--quick"]
    assert cli.parse_args(["bench"]).which == "logits"
    with pytest.raises(SystemExit):
        cli.parse_args(["fly"])
    from fastupg.evaluate import add_eval_args   # the eval subcommand's parser accepts what we pass through
    import argparse
    ns = add_eval_args(argparse.ArgumentParser()).parse_args(a.rest[:0] + ["--model", "m", "--data", "d", "--out", "o"])
    assert ns.model == "m"


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "fastupg", "train", "max_stepz=3"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "max_steps" in r.stderr
