"""scripts/reproduce.py: every method runs and logs in --quick mode; the budget is the same for every method;
the table/summary arithmetic; resumability."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("reproduce", REPO / "scripts" / "reproduce.py")
rp = importlib.util.module_from_spec(_spec)
sys.modules["reproduce"] = rp
_spec.loader.exec_module(rp)


def test_same_budget_for_every_method(tmp_path):
    from fastupg.config import load_config
    b = rp.Budget(steps=6, group=4, prompts_per_step=3)
    for m in rp.METHODS:
        path, kw = rp.run_overrides(m, b, seed=5, out=tmp_path / m)
        cfg = load_config(path, (), **kw)
        stages = cfg.stage_configs() if cfg.stages else [cfg]
        assert sum(s.max_steps for s in stages) == 6, m
        for s in stages:
            assert s.seed == 5 and s.learning_rate == b.learning_rate
            assert (s.sampling.temperature, s.optim.lr_scheduler_type, s.optim.min_lr_ratio) == \
                (b.temperature, b.lr_scheduler_type, b.min_lr_ratio), m
            if s.loss_type == "sft":
                assert s.per_device_train_batch_size == 3  # demonstrations = prompts per step
            else:
                demo = 1 if s.loss_type in ("luffy", "srft") else 0  # the demonstration joins the group
                assert s.num_generations + demo == 4, m
                assert s.per_device_train_batch_size == s.num_generations * 3, m
    path, kw = rp.run_overrides("hpt", b, 0, tmp_path)
    assert load_config(path, (), **kw).loss_type == "hpt"


def test_sft_fraction_ends_average_a_sixth_of_the_steps():
    hist = [{"step": i + 1, "hpt/sft_fraction": f} for i, f in enumerate([1.0, 0.5] + [0.25] * 8 + [0.0, 0.125])]
    hist.insert(3, {"step": 3, "eval/accuracy": 0.5})          # eval rows carry no fraction: skipped
    assert rp.sft_fraction_ends(hist) == {"sft_fraction_start": 0.75, "sft_fraction_end": 0.0625}
    assert rp.sft_fraction_ends([{"step": 1, "loss": 0.1}]) == {"sft_fraction_start": None, "sft_fraction_end": None}


def test_summary_and_markdown():
    runs = [{"method": "hpt", "seed": s, "train_seconds": 1.0, "sft_fraction_start": 1.0, "sft_fraction_end": f,
             "accuracy": {"easy": e, "medium": 0.1, "hard": 0.0, "all": e / 2}}
            for s, e, f in ((0, 0.2, 0.5), (1, 0.4, 0.25))]
    t = rp.summarize(runs)["hpt"]
    assert t["easy"][0] == pytest.approx(0.3) and t["easy"][1] == pytest.approx(math.sqrt(0.02))
    assert t["sft_fraction_end"][0] == pytest.approx(0.375) and t["seeds"] == [0, 1]
    md = rp.to_markdown({"hpt": t}, ["hpt", "missing"])
    assert "| hpt | 30.0 ± 14.1 | 10.0 ± 0.0 |" in md and "missing" not in md
    assert "1.00 -> 0.38" in md


def test_bad_arguments():
    with pytest.raises(ValueError, match="--methods"):
        rp.main(["--methods", "hpt,ppo", "--quick"])
    with pytest.raises(ValueError, match="--ablations"):
        rp.main(["--ablations", "tabel5", "--quick"])
    with pytest.raises(ValueError, match="group"):
        rp.Budget(group=1)


def test_quick_every_method_runs_and_logs(tmp_path, capsys):
    top = tmp_path / "rq"
    assert rp.main(["--quick", "--out", str(top)]) == 0
    out = rp.budget_dir(top, rp.QUICK)                 # everything of this budget lives under its own folder
    res = json.loads((out / "results.json").read_text())
    assert set(res["table"]) == set(rp.METHODS) | {"base"}   # + the untrained base, evaluated once
    for r in res["runs"]:
        assert r["steps"] == rp.QUICK.steps
        acc = r["accuracy"]
        levels = {rp.level_label(d) for d, _ in rp.task_overrides()["embedded_mix"]}   # the demo's task levels
        assert set(acc) == levels | {"all", "n_eval"} and all(0 <= acc[k] <= 1 for k in acc if k != "n_eval")
        hist = rp._history(out / r["method"] / "seed0")
        assert [h["step"] for h in hist if "loss" in h or "reward" in h], r["method"]  # training metrics logged
        assert any("eval/accuracy" in h for h in hist), r["method"]
        # only HPT routes prompts; its fraction is a real fraction
        assert (r["sft_fraction_end"] is not None) == (r["method"] == "hpt")
    hpt_hist = rp._history(out / "hpt" / "seed0")
    assert all(0 <= h["hpt/sft_fraction"] <= 1 for h in hpt_hist if "hpt/sft_fraction" in h)
    # sft-then-grpo: both stages' steps, the second offset after the first
    steps = [h["step"] for h in rp._history(out / "sft-then-grpo" / "seed0") if "eval/accuracy" in h]
    assert max(steps) == rp.QUICK.steps
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == len(rp.METHODS) + 1 and "\n| base | " in md   # + the untrained base's row
    assert (out / "curves.png").stat().st_size > 1000
    # resumable: a second call trains nothing (every result.json exists) and reports the same numbers
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/seed0/result.json")}
    capsys.readouterr()
    assert rp.main(["--quick", "--out", str(top), "--methods", "hpt,grpo"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed0/result.json")} == before
    again = json.loads((out / "results.json").read_text())
    assert again["table"]["hpt"]["all"] == res["table"]["hpt"]["all"]


def test_quick_and_full_runs_never_share_folders(tmp_path):
    full, quick = rp.budget_dir(tmp_path, rp.Budget()), rp.budget_dir(tmp_path, rp.QUICK)
    assert full != quick and quick.name.startswith("quick-") and full.parent == quick.parent == tmp_path
    assert rp.budget_dir(tmp_path, rp.Budget(steps=61)) != full      # any other budget: another folder


def test_a_result_from_other_settings_is_never_reused(tmp_path, monkeypatch):
    """A result.json in the run folder counts only when its spec (budget, overrides, recipe text) is this run's;
    otherwise the run is trained again (here with a fake trainer and evaluation: no model is built)."""
    import fastupg.trainer
    trained = []

    def fake_train(cfg, log=None):
        trained.append(cfg.max_steps)
        return {"final_checkpoint": "unused"}
    monkeypatch.setattr(fastupg.trainer, "train", fake_train)
    monkeypatch.setattr(rp, "eval_per_level", lambda ckpt, cfg, n: {"easy": 0.5, "all": 0.5, "n_eval": n})
    out = tmp_path / "hpt" / "seed0"
    b = rp.Budget(steps=3, group=2, prompts_per_step=1)
    stale = dict(method="hpt", seed=0, steps=2, train_seconds=1.0, accuracy={"all": 0.9})   # e.g. a --quick result
    out.mkdir(parents=True)
    (out / "result.json").write_text(json.dumps(stale))
    r = rp.run_one("hpt", 0, b, out)
    assert trained == [3] and r["accuracy"]["all"] == 0.5
    again = rp.run_one("hpt", 0, b, out)                               # same spec: reused, nothing trained
    assert trained == [3] and again == json.loads((out / "result.json").read_text())
    rp.run_one("hpt", 0, rp.Budget(steps=4, group=2, prompts_per_step=1), out)   # other budget: trained again
    assert trained == [3, 4]


def test_bad_argument_from_the_command_line_is_one_line_exit_2():
    import subprocess
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce.py"), "--methods", "hpt,ppo", "--quick"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--methods" in r.stderr
