"""The README's "Use it in TRL" / "Use it in verl" code runs as written: each python block after a
`<!-- snippet: NAME -->` marker is extracted from README.md and executed in a fresh folder."""
import os

# set before anything imports triton (TRL/verl do, at import): the kernel tests in the same session need the interpreter
os.environ.setdefault("TRITON_INTERPRET", "1")

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet(name: str) -> str:
    m = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert m, f"README.md has no python block after <!-- snippet: {name} -->"
    return m.group(1)


def _run(code: str, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__readme__"}
    exec(compile(code, str(README), "exec"), ns)
    return ns


def test_use_it_in_trl_runs(tmp_path, monkeypatch):
    import trl  # noqa: F401  (installed by the README test command: missing must fail, not skip)
    ns = _run(_snippet("trl"), tmp_path, monkeypatch)
    logs = [h for h in ns["trainer"].state.log_history if "loss" in h]
    assert len(logs) == 2 and all("clip_ratio/region_mean" in h and "kl" in h for h in logs)


def test_use_it_in_verl_runs(tmp_path, monkeypatch):
    import verl.trainer.ppo.core_algos  # noqa: F401  (installed by the README test command: missing must fail, not skip)
    ns = _run(_snippet("verl"), tmp_path, monkeypatch)
    assert ns["log_prob"].grad is not None and set(ns["metrics"]) == {
        "actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
