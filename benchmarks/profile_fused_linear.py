"""Where the time of one fused-linear training step goes (CUDA): torch.profiler's kernel table for the default impl.

    python benchmarks/profile_fused_linear.py --n 8192 --d 1536 [--impl chunked] [--chunk-mib 256]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_fused_linear as bfl  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=1536)
    ap.add_argument("--impl", default="chunked")
    ap.add_argument("--chunk-mib", type=int, default=None)
    a = ap.parse_args()
    p = bfl.Problem(a.n, a.d, 151936, torch.bfloat16, "cuda", 4096)
    kw = {} if a.chunk_mib is None else dict(chunk_bytes=a.chunk_mib * 2 ** 20)
    fwd, (h, w) = bfl.m_fastupg(a.impl, **kw)(p)
    for _ in range(2):
        h.grad = w.grad = None
        fwd().backward()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        h.grad = w.grad = None
        fwd().backward()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
