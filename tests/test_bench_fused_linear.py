"""The fused-linear benchmark's --quick CPU mode (CI): it runs, writes CSV/JSON/PNG, and its rows are sane; the
pytest-benchmark suite runs on the same quick sizes and its JSON feeds the same plotting script."""
import json
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_quick_mode_writes_rows_json_and_plots(tmp_path):
    import bench_fused_linear as bfl
    rows = bfl.main(["--quick", "--out", str(tmp_path)])
    assert {r["method"] for r in rows} == set(bfl.QUICK)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["total_ms"] > 0 and r["peak_extra_mib"] is not None
    gemm = [r for r in rows if r["method"] == "gemm"]
    assert all(r["x_gemm"] == 1.0 for r in gemm)
    assert all(r["x_chunked"] == 1.0 for r in rows if r["method"] == "fastupg-chunked")  # the column of the peer
    doc = json.loads((tmp_path / "fused_linear.json").read_text())
    assert len(doc["benchmarks"]) == len(rows)
    assert (tmp_path / "fused_linear_D_40.png").stat().st_size > 1000
    assert (tmp_path / "fused_linear.csv").exists() and (tmp_path / "fused_linear.txt").exists()
    # the reference materialises N x V logits: the memory column can tell it from the chunked impl
    mem = {(r["method"], r["N"]): r["peak_extra_mib"] for r in rows}
    assert mem[("fastupg-torch", 128)] > mem[("fastupg-chunked", 128)]


def test_pytest_benchmark_suite_json_plots(tmp_path):
    import pytest_benchmark  # noqa: F401  (installed by the README test command: missing must fail, not skip)
    from _bench_common import run_suite_quick
    out = tmp_path / "out.json"
    doc = run_suite_quick("test_bench_fused_linear.py", "N64 and (chunked or gemm)", out)
    names = {b["extra_info"]["method"] for b in doc["benchmarks"]}
    assert names == {"fastupg-chunked", "gemm"}
    from plot_bench import plot
    assert plot(str(out), str(tmp_path / "png"))


def test_variant_rows_set_and_restore_the_loss_kernel_form():
    """fastupg-chunked-1launch times the chunked impl with the fused loss kernel's one-launch form: set for its
    runs only (under the interpreter, in a subprocess, so that the form really runs), SPLIT as it was afterwards."""
    import subprocess
    code = """
import bench_fused_linear as bfl
from fastupg.kernels import _logits_triton as KT
before = dict(KT.SPLIT)
rows = bfl.main(["--quick", "--methods", "fastupg-chunked-1launch", "gemm"])
assert [r["status"] for r in rows] == ["ok"] * 4, rows
assert KT.LAST_LAUNCH.get("form") == "one" and KT.SPLIT == before, (KT.LAST_LAUNCH, KT.SPLIT)
print("OK")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "benchmarks")]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-3000:]
