"""Compile the fused-linear Triton kernels for an NVIDIA target without a GPU (ptxas ships with triton).

The CPU tests run the kernels under TRITON_INTERPRET=1, which accepts programs the GPU compiler refuses (e.g. a
variable redefined with another dtype inside a data-dependent `if`). This compiles each backward kernel variant the
host code can launch, through ptxas, for sm_90 (H100/H200):

    python benchmarks/compile_fused_linear.py                 # bf16 and fp32, every variant (a few minutes of CPU)
    python benchmarks/compile_fused_linear.py --quick         # bf16 dH and dW passes with filtering (CI test)

Exit code 0 when everything compiled; prints one line per kernel with its shared memory and registers per thread
(this machine's triton: the GPU's version may allocate differently).
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1 (it replaces the compiler by the interpreter)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import fastupg.kernels._fused_linear_triton as flt  # noqa: E402
from _bench_common import aligned_attrs, cubin_resources  # noqa: E402
from fastupg.kernels._fused_linear_common import FusedLinearOptions  # noqa: E402

INTS = {"N", "M", "V", "D", "stride_hn", "stride_wv", "blocks_per_prog", "nprog"}
FLOATS = {"inv_t", "tile_eps"}
FP32_PTRS = {"LSE", "ENT", "GL", "GH", "LOGP", "DB", "SLAB"}


def signature(fn, dt: str, consts: dict) -> dict:
    """Triton's signature strings for the kernel's parameters (inputs and gradients in dt, statistics fp32)."""
    sig = {}
    for p in inspect.signature(fn.fn).parameters:
        if p in consts:
            sig[p] = "constexpr"
        elif p in INTS:
            sig[p] = "i32"
        elif p in FLOATS:
            sig[p] = "fp32"
        elif p in ("TGT", "ROWS"):
            sig[p] = "*i64"
        elif p == "SKIPS":
            sig[p] = "*i32"
        else:
            sig[p] = "*fp32" if p in FP32_PTRS else f"*{dt}"
    return sig


def variants(quick: bool):
    """(kernel, dtype, constexprs): what _triton_forward / _triton_backward can launch on a GPU."""
    o = FusedLinearOptions(impl="triton")  # default blocks; the dW pass owns block_n vocab entries, loops block_v rows
    blocks = dict(BLOCK_N=o.block_n, BLOCK_V=o.block_v, BLOCK_D=o.block_d)
    dw_blocks = dict(BLOCK_N=o.block_v, BLOCK_V=o.block_n, BLOCK_D=o.block_d)
    for dt in (["bf16"] if quick else ["bf16", "fp32"]):
        ieee = dt == "fp32"
        if not quick:
            yield flt._fwd_kernel, dt, dict(HAS_BIAS=True, RETURN_ENT=True, IEEE=ieee, UPCAST=False, **blocks)
        for in_place in ([ieee] if quick else sorted({ieee, False})):
            for filt in ([True] if quick else [False, True]):
                common = dict(HAS_BIAS=True, HAS_GH=True, FILTER=filt, IEEE=ieee, UPCAST=False, IN_PLACE=in_place)
                yield flt._dh_kernel, dt, dict(**common, **blocks)
                yield flt._dw_kernel, dt, dict(NEED_DW=True, NEED_DB=True, **common, **dw_blocks)
        if not quick:
            yield flt._dw_kernel, dt, dict(NEED_DW=False, NEED_DB=True, HAS_BIAS=True, HAS_GH=False, FILTER=False,
                                           IEEE=ieee, UPCAST=False, IN_PLACE=False, **dw_blocks)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="bf16 dH and dW passes with filtering only")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability (default 90: H100/H200)")
    a = ap.parse_args(argv)
    target = GPUTarget("cuda", a.arch, 32)
    for fn, dt, consts in variants(a.quick):
        sig = signature(fn, dt, consts)
        # as a launch at the benchmark's shapes specialises it (N, V, D and the strides multiples of 16)
        attrs = aligned_attrs(fn, {p for p, s in sig.items() if s.startswith("*")} |
                              {"N", "M", "V", "D", "stride_hn", "stride_wv"})
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=dict(num_warps=4, num_stages=3))
        flags = " ".join(f"{n}={int(v)}" for n, v in consts.items())
        regs, stack = cubin_resources(k)
        print(f"ok  {fn.fn.__name__:<12} {dt:<5} {flags}  shared {k.metadata.shared} B, {regs} registers/thread"
              f"{f', {stack} B stack (spills)' if stack else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
