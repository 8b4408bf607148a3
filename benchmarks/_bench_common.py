"""Written once, used by several benchmark scripts and pytest-benchmark suites in benchmarks/ (torch only)."""
from __future__ import annotations

import os

import torch


class NonLeafAlias(torch.autograd.Function):
    """A non-leaf alias of a leaf (what lm_head hands a loss), so inplace_backward=True is allowed on it."""

    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, g):
        return g


alias = NonLeafAlias.apply


def quick_mode() -> bool:
    """pytest-benchmark suites: tiny sizes on the CPU paths without CUDA or with FASTUPG_BENCH_QUICK=1."""
    return os.environ.get("FASTUPG_BENCH_QUICK") == "1" or not torch.cuda.is_available()


class OneAtATime:
    """A cache of benchmark problems that keeps one alive at a time (GPU memory): get(key, make) builds it once."""

    def __init__(self):
        self._held: dict = {}

    def get(self, key, make):
        if key not in self._held:
            self._held.clear()
            self._held[key] = make()
        return self._held[key]


def time_step(benchmark, step, cuda: bool, rounds: int) -> None:
    """pytest-benchmark: time step() (and a CUDA sync) `rounds` times after one warm-up; the median in ms goes to
    extra_info["total_ms"] (what plot_bench.py reads)."""
    def timed():
        step()
        if cuda:
            torch.cuda.synchronize()
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["total_ms"] = benchmark.stats.stats.median * 1e3


def run_suite_quick(suite: str, select: str, json_out) -> dict:
    """Run the pytest-benchmark suite benchmarks/<suite> in quick mode (FASTUPG_BENCH_QUICK=1, tests chosen by
    `pytest -k select`) in a fresh interpreter; returns its --benchmark-json document (CI checks of the suites)."""
    import json
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, FASTUPG_BENCH_QUICK="1", PYTHONPATH=os.path.dirname(here))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(here, suite),
                        "-k", select, f"--benchmark-json={json_out}"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with open(json_out) as f:
        return json.load(f)


def aligned_attrs(fn, divisible) -> dict:
    """ASTSource attributes for compiling a @triton.jit kernel as a launch specialises it: the parameters named in
    `divisible` (pointers, strides, sizes that are multiples of 16 at real shapes) divisible by 16. Without them the
    compiler cannot vectorise loads (2 bytes per element instead of 16 bytes per thread) and the registers it reports
    are not those of the launched kernel."""
    import inspect  # noqa: PLC0415
    return {(i,): [["tt.divisibility", 16]] for i, p in enumerate(inspect.signature(fn.fn).parameters)
            if p in divisible}


def cubin_resources(compiled) -> tuple[int, int]:
    """(registers per thread, stack bytes) of a kernel compiled by triton.compile for an NVIDIA target, read from its
    cubin with the cuobjdump that ships with triton (no GPU needed)."""
    import re  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import triton  # noqa: PLC0415
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    reg, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return int(reg.group(1)), int(stack.group(1)) if stack else 0
