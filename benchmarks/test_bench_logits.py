"""bench_logits.py as a pytest-benchmark suite (comparable across commits with pytest-benchmark's tools):

    pytest benchmarks/test_bench_logits.py --benchmark-json out.json      # CUDA: 8x1024 and 4x8192 tokens, V=151936
    FASTUPG_BENCH_LOGITS_SIZES=8x1024 pytest benchmarks/test_bench_logits.py --benchmark-json out.json
    python benchmarks/plot_bench.py out.json --out DIR                    # PNG: time / peak memory vs N

Without CUDA (or with FASTUPG_BENCH_QUICK=1) it runs tiny sizes on the CPU paths. Each test times forward +
backward of one method at one size and records method, N, peak_extra_mib, device in extra_info.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_logits as bl  # noqa: E402
from _bench_common import OneAtATime, quick_mode, time_step  # noqa: E402

pytest.importorskip("pytest_benchmark")

QUICK = quick_mode()
if QUICK:
    SIZES, V = [(2, 8), (2, 32)], 1031
    METHODS = ["fastupg-fused", "fastupg-logprobs", "eager"]
else:
    SIZES = [tuple(int(x) for x in s.split("x")) for s in
             os.environ.get("FASTUPG_BENCH_LOGITS_SIZES", "8x1024,4x8192").split(",")]
    V = 151936
    METHODS = [m for m in bl.METHODS if m != "torch.compile"]  # (compile: in the script, where it is warmed once)

_problems = OneAtATime()


def _problem(B, T):
    return _problems.get((B, T), lambda: bl.Problem(B, T, V, torch.device("cpu" if QUICK else "cuda")))


@pytest.mark.parametrize("B,T", SIZES, ids=[f"{b}x{t}" for b, t in SIZES])
@pytest.mark.parametrize("method", METHODS)
def test_logits_grpo_loss(benchmark, method, B, T):
    p = _problem(B, T)
    cuda = not QUICK
    step = bl.make_step(method, p)
    if step is None:
        pytest.skip(f"{method}: not available here")
    step()  # the call works (and compiles) before timing
    benchmark.group = f"logits GRPO loss fwd+bwd (V={V})"
    benchmark.extra_info.update(method=method, N=p.N, B=B, T=T, V=V, peak_extra_mib=bl.peak_mib(step, cuda),
                                device=torch.cuda.get_device_name() if cuda else "cpu")

    time_step(benchmark, step, cuda, rounds=3 if QUICK else 20)
