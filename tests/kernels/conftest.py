import os
import subprocess
import sys

import pytest

# Must happen before triton is imported anywhere: the kernels run on Triton's CPU interpreter here.
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


@pytest.fixture
def compile_for_gpu():
    """compile_for_gpu("compile_logits.py") runs benchmarks/<script> --quick in a subprocess without
    TRITON_INTERPRET (this process runs triton in interpreter mode): the kernels through the GPU compiler and the
    ptxas that ship with triton, no GPU needed. Returns the CompletedProcess after asserting exit code 0."""
    def run(script: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = ROOT
        r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick"],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return r
    return run
