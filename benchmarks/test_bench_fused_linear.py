"""bench_fused_linear.py as a pytest-benchmark suite (comparable across commits with pytest-benchmark's tools):

    pytest benchmarks/test_bench_fused_linear.py --benchmark-json out.json     # CUDA: N=8192, D=1536 by default
    FASTUPG_BENCH_SIZES=8192x1536,32768x3584 pytest benchmarks/ --benchmark-json out.json
    python benchmarks/plot_bench.py out.json --out DIR                           # PNG: time / peak memory vs N

Without CUDA (or with FASTUPG_BENCH_QUICK=1) it runs the --quick sizes on the CPU paths. Each test times forward +
backward of one method at one (N, D) (V = 151936 on CUDA) and records method, N, D, peak_extra_mib in extra_info.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fused_linear as bfl  # noqa: E402
from _bench_common import OneAtATime, quick_mode, time_step  # noqa: E402

pytest.importorskip("pytest_benchmark")

QUICK = quick_mode()
if QUICK:
    SIZES, V, SEQ = [(64, 40), (128, 40)], 1031, 64
    METHODS = list(bfl.QUICK)
else:
    SIZES = [tuple(int(x) for x in s.split("x")) for s in os.environ.get("FASTUPG_BENCH_SIZES", "8192x1536").split(",")]
    V, SEQ = 151936, 4096
    METHODS = [m for m in bfl.METHODS if m != "fastupg-torch" and m != "eager"]  # N x V peers: in the script only

_problems = OneAtATime()


def _problem(N, D):
    return _problems.get((N, D), lambda: bfl.Problem(N, D, V, torch.bfloat16, "cpu" if QUICK else "cuda", SEQ))


@pytest.mark.parametrize("N,D", SIZES, ids=[f"N{n}-D{d}" for n, d in SIZES])
@pytest.mark.parametrize("method", METHODS)
def test_fused_linear(benchmark, method, N, D):
    p = _problem(N, D)
    cuda = not QUICK
    row = bfl.run_one(method, p, cuda, reps=1)  # correctness of the call + peak memory (and a first timing)
    if row["status"] != "ok":
        pytest.skip(f"{method}: {row['status']}")
    benchmark.group = f"fused_linear D={D}"
    benchmark.extra_info.update(method=method, N=p.N, D=D, V=V, peak_extra_mib=row["peak_extra_mib"],
                                device=torch.cuda.get_device_name() if cuda else "cpu")
    if method == "gemm":
        g = bfl._Gemm(p)

        def step():
            g.fwd()
            g.bwd()
    else:
        fwd, (h, w) = bfl.METHODS[method](p)

        def step():
            h.grad = w.grad = None
            fwd().backward()

    time_step(benchmark, step, cuda, rounds=3 if QUICK else 5)
