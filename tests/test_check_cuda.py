"""benchmarks/check_cuda.py's own logic, before it costs GPU time: `--smoke` runs every one of its checks (every
preset and launch form, the fused-linear impls, the N x V > 2^31 checks' block-by-block oracles) at tiny sizes on
the CPU interpreter, and every check must pass. (What it checks on a GPU, the compiled kernels, it cannot here.)"""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_check_cuda_smoke_passes_on_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "check_cuda.py"), "--smoke"], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert "# 0 failure(s)" in lines
    checked = [ln for ln in lines if ln.startswith("ok ")]
    assert len(checked) > 100 and not any(ln.startswith("BAD") for ln in lines)
    for op in ("fused_policy_loss+1launch-lag1+inplace", "fused_policy_loss+1launch-nograd",
               "fused_policy_loss_large+1launch", "fused_linear_large[1pass]"):
        assert any(ln.split()[1] == op for ln in checked), op


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it would run every check")
def test_check_cuda_without_gpu_says_so():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "check_cuda.py")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "needs a CUDA GPU" in r.stderr
