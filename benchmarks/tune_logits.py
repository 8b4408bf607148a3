"""Sweep the launch configurations of the logits kernels (fastupg.kernels.logits.LAUNCH) on this GPU.

    python benchmarks/tune_logits.py                 # [8, 1024, 151936] bf16; prints ms per config, best first

Three kinds, timed separately (triton.testing.do_bench):
  stats  token_logprobs forward under no_grad (one reduction pass over the vocabulary)
  grad   token_logprobs forward + backward, with the stats config fixed (backward = one elementwise pass)
  fused  fused_policy_loss forward, GRPO preset (reduction pass + gradient pass in one launch)
The defaults in LAUNCH are the winners of this sweep on the GPU named in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton.testing  # noqa: E402

from fastupg.estimator import Estimator  # noqa: E402
from fastupg.kernels import fused_policy_loss, token_logprobs  # noqa: E402
from fastupg.kernels import logits as K  # noqa: E402

REDUCE = [(1024, 1, 2), (2048, 1, 2), (2048, 1, 4), (4096, 1, 2), (2048, 2, 2), (4096, 2, 2), (4096, 4, 2),
          (8192, 8, 1), (8192, 16, 1)]
ELEMENTWISE = [(2048, 4, 1), (4096, 8, 1), (4096, 16, 1), (8192, 16, 1), (2048, 1, 2), (4096, 4, 2)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[8, 1024, 151936], metavar=("B", "T", "V"))
    a = ap.parse_args(argv)
    B, T, V = a.shape
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g, device=dev) * 2).bfloat16()
    y = torch.randint(0, V, (B, T), generator=g, device=dev)
    adv = torch.randn(B, T, generator=g, device=dev)
    with torch.no_grad():
        old = token_logprobs(logits, y) + 0.1 * torch.randn(B, T, generator=g, device=dev)
    est = Estimator.preset("grpo")
    gbytes = logits.numel() * logits.element_size() / 1e9
    print(f"# {torch.cuda.get_device_name()} shape {a.shape} bf16 ({gbytes:.2f} GB of logits)")

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=5, rep=50)

    def fwd_only():
        with torch.no_grad():
            token_logprobs(logits, y)

    def fwd_bwd():
        z = logits.detach().requires_grad_()
        token_logprobs(z, y).sum().backward()

    def fused():
        z = logits.detach().requires_grad_()
        fused_policy_loss(z, y, est, advantages=adv, old_logp=old)

    results = {}
    # (the fused-loss kernel's (chunk, warps) are swept by `bench_logits.py --tune`)
    for kind, space, fn, passes in (("stats", REDUCE, fwd_only, 1), ("grad", ELEMENTWISE, fwd_bwd, 3)):
        rows = []
        for block, warps, stages in space:
            K.LAUNCH[kind] = dict(block=block, warps=warps, stages=stages, **({"block_g": block}
                                                                               if kind == "fused" else {}))
            try:
                ms = bench(fn)
            except Exception as e:  # noqa: BLE001
                print(f"# {kind} {block}/{warps}/{stages}: {type(e).__name__}: {str(e)[:120]}")
                continue
            rows.append((ms, block, warps, stages))
        if kind == "fused":  # gradient block of the fused kernel, with the best reduction config
            _, b0, w0, s0 = min(rows)
            for bg in (1024, 4096, 8192):
                K.LAUNCH[kind] = dict(block=b0, warps=w0, stages=s0, block_g=bg)
                rows.append((bench(fn), b0, w0, s0, bg))
        rows.sort()
        best = rows[0]
        K.LAUNCH[kind] = dict(block=best[1], warps=best[2], stages=best[3],
                              **({"block_g": best[4] if len(best) > 4 else best[1]} if kind == "fused" else {}))
        results[kind] = K.LAUNCH[kind]
        print(f"\n{kind}: ms, block, warps, stages[, block_g]   (GB/s counting {passes} pass(es) over the logits)")
        for r in rows:
            print(f"  {r[0]:8.3f}  {r[1:]}  {passes * gbytes / (r[0] * 1e-3):7.0f} GB/s")
    print(f"\nbest: {results}")


if __name__ == "__main__":
    main()
