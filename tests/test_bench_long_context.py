"""benchmarks/bench_long_context.py --quick runs on CPU: every method it can import takes a full optimizer step."""
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_long_context.py"


def test_quick_run_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_long_context", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    assert mod.main(["--quick", "--sizes", "128", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["sizes"] == [128]
    for m in ("fastupg", "hf"):
        r = res["results"][m]["128"]
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["response_tokens"] > 0, r
    assert res["longest_fit"]["fastupg"] == 128
    assert "longest micro-batch that fits, fastupg: 128" in capsys.readouterr().out
