"""Compile the fused logits-loss kernel for an NVIDIA target without a GPU: registers per thread and programs per SM.

The CPU interpreter accepts kernels the GPU compiler refuses and never shows what the compiler makes of them. This
compiles `_fused_kernel` (GRPO preset, bf16 logits, V = 151936) for sm_90 with the ptxas that ships with triton and
reads the registers per thread from the cubin (cuobjdump, also shipped): on an H100 the one-launch form of
2026-11-25 was measured slow because it needed 127-252 registers (1-9 programs per SM: too few bytes in flight),
see benchmarks/RESULTS.md.

    python benchmarks/compile_logits.py            # every (chunk, warps) of bench_logits.TUNE, every form
    python benchmarks/compile_logits.py --quick    # one configuration, the forms the host can launch (CI test)

Columns: the three-launch form's PHASE 1 (stats), 2 (row) and 3 (gradient), and the one-launch form's PHASE 0 (see
SPLIT in fastupg/kernels/_logits_triton.py). programs/SM = what the registers leave (65536 per SM, allocated per warp
in units of 256), capped by 64 warps and 32 blocks per SM (sm_90). Registers depend on the triton version: the
figures printed are this machine's compiler's, not a GPU measurement. Exit code 0 when everything compiled.
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

import fastupg.kernels._logits_triton as lt  # noqa: E402
from _bench_common import aligned_attrs, cubin_resources  # noqa: E402

V = 151936
INTS = {"sb", "st", "TR", "gsb", "gst", "N", "lag"}
PHASES = {"3:stats": 1, "3:row": 2, "3:grad": 3, "1:all": 0}  # the launches _launch_rows can make


def signature(consts: dict) -> dict:
    sig = {}
    for p in inspect.signature(lt._fused_kernel.fn).parameters:
        if p in consts:
            sig[p] = "constexpr"
        elif p in ("logits_ptr", "grad_ptr"):
            sig[p] = "*bf16"
        elif p == "tgt_ptr":
            sig[p] = "*i64"
        elif p == "info_ptr":
            sig[p] = "*i8"
        elif p in ("flags_ptr", "cnt_ptr", "tick_ptr"):
            sig[p] = "*i32"
        elif p.endswith("_ptr"):
            sig[p] = "*fp32"
        else:
            sig[p] = "i32" if p in INTS else "fp32"
    return sig


def grpo_consts(chunk: int, phase: int) -> dict:
    K = -(-V // chunk)
    return dict(V=V, CHUNK=chunk, K=K, KP=1 << (K - 1).bit_length(), PHASE=phase, WRITE_GRAD=True, ON_REF=1,
                ON_MASK=1, OFF_REF=0, OFF_MASK=0, ON_A1=False, OFF_A1=False, HAS_ADV=True, HAS_OLD=True, DUAL=False,
                KL_EST=0, KL_ON=False, HAS_ENT=False)


def registers(chunk: int, warps: int, phase: int, arch: int = 90) -> tuple[int, int]:
    """(registers per thread, stack bytes) of the compiled kernel."""
    consts = grpo_consts(chunk, phase)
    sig = signature(consts)
    # as a launch specialises it (V = 151936 is a multiple of 16): pointers and row strides 16-divisible
    attrs = aligned_attrs(lt._fused_kernel, {p for p, s in sig.items() if s.startswith("*")} | {"sb", "st", "gsb", "gst"})
    k = triton.compile(ASTSource(lt._fused_kernel, sig, consts, attrs),
                       target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=1))
    return cubin_resources(k)


def programs_per_sm(regs: int, warps: int) -> int:
    per_warp = -(-regs * 32 // 256) * 256
    return max(0, min(65536 // (per_warp * warps), 64 // warps, 32))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="chunk 1024 x 4 warps only")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability (default 90: H100/H200)")
    a = ap.parse_args(argv)
    if a.quick:
        configs = [(1024, 4)]
    else:
        from bench_logits import TUNE  # noqa: PLC0415
        configs = sorted({(c[0], c[1]) for c in TUNE})
    print(f"# _fused_kernel, GRPO, bf16, V = {V}, sm_{a.arch}, triton {triton.__version__}: registers/thread "
          "(programs/SM), stack bytes spilled when any; 3: the three-launch form's launches, 1: the one-launch form")
    print(f"{'chunk x warps':>14} " + " ".join(f"{f:>14}" for f in PHASES))
    for chunk, warps in configs:
        cells = []
        for phase in PHASES.values():
            regs, stack = registers(chunk, warps, phase, a.arch)
            cells.append(f"{regs:>5} ({programs_per_sm(regs, warps):>2})" + (f" {stack}B" if stack else ""))
        print(f"{chunk:>8} x {warps:>3} " + " ".join(f"{c:>14}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
