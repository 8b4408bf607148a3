"""The logits benchmark's --quick CPU mode (CI): it runs, writes JSON/table/PNG, its rows are sane; the
pytest-benchmark suite runs on the quick sizes and its JSON feeds the same plotting script."""
import json
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_quick_mode_writes_json_table_and_plots(tmp_path):
    import bench_logits as bl
    rows = bl.main(["--quick", "--sizes", "2x8", "2x16", "--methods", "fastupg-fused", "eager", "liger",
                    "--out", str(tmp_path)])
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["method"] for r in ok} == {"fastupg-fused", "eager"} and all(r["total_ms"] > 0 for r in ok)
    assert {r["status"] for r in rows if r["method"] == "liger"} == {"not available here"}  # (GPU only)
    doc = json.loads((tmp_path / "bench_logits.json").read_text())
    assert {(b["extra_info"]["method"], b["extra_info"]["N"]) for b in doc["benchmarks"]} == \
        {(m, n) for m in ("fastupg-fused", "eager") for n in (16, 32)}
    assert (tmp_path / "bench_logits.txt").exists()
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 1000


def test_cli_errors_exit_2(capsys):
    import bench_logits as bl
    with pytest.raises(SystemExit) as e:
        bl.main(["--quick", "--sizes", "8by1024"])
    assert e.value.code == 2 and "--sizes" in capsys.readouterr().err


def test_pytest_benchmark_suite_json_plots(tmp_path):
    import pytest_benchmark  # noqa: F401  (installed by the README test command: missing must fail, not skip)
    from _bench_common import run_suite_quick
    out = tmp_path / "out.json"
    doc = run_suite_quick("test_bench_logits.py", "2x8 and (eager or fused)", out)
    assert {b["extra_info"]["method"] for b in doc["benchmarks"]} == {"fastupg-fused", "eager"}
    from plot_bench import plot
    assert plot(str(out), str(tmp_path / "png"))


def test_tune_runs_and_checks_every_form(capsys):
    """--tune on the CPU: every launch form (three launches, one launch at several lags) runs and agrees with the
    default form before it may be timed; the sweep leaves SPLIT set to one of them."""
    import torch

    import bench_logits as bl
    from fastupg.kernels import _logits_triton as KT
    saved = dict(KT.SPLIT)
    try:
        forms = [(1024, 1, False, 0), (1024, 1, True, 1), (2048, 4, True, 3)]
        split = bl.tune(bl.Problem(2, 8, 1031, torch.device("cpu")), configs=forms)
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("# tune chunk=")]
        assert len(lines) == 3 and not any("BAD" in ln for ln in lines), lines
        assert (split["chunk"], split["warps"], split["one_launch"]) in {f[:3] for f in forms}
    finally:
        KT.SPLIT.clear()
        KT.SPLIT.update(saved)
