"""Benchmark the logits-input kernels against their peers, same run, same device.

    python benchmarks/bench_logits.py            # GPU: [8,1024,151936] and [4,8192,151936] bf16
    python benchmarks/bench_logits.py --quick    # tiny CPU smoke run (torch paths + interpreter-free refs only)

Rows: token_logprobs (log-prob + entropy, fwd+bwd) and the GRPO loss (fwd+bwd) for
  fastupg (Triton), PyTorch eager, torch.compile, Liger-Kernel's Triton GRPO loss (if installed).
Columns: time (ms, triton.testing.do_bench on GPU), peak memory beyond inputs (MiB), achieved bandwidth
(bytes the kernel design must move / time) and its fraction of a measured device-to-device copy.
Prints a table; --csv writes it. Timings are only comparable within one run on one device.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastupg import Estimator, policy_loss  # noqa: E402
from fastupg.kernels import fused_policy_loss, token_logprobs  # noqa: E402


def bench(fn, device) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton
        return float(triton.testing.do_bench(fn, warmup=5, rep=30))
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[1] * 1e3


def peak_mib(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth(device, nbytes=2**30) -> float | None:
    """GB/s of a device-to-device copy (read + write counted), the roofline of a memory-bound kernel."""
    if device.type != "cuda":
        return None
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def eager_logprobs(z, t, T):
    logq = torch.log_softmax(z.float() / T, -1)
    lp = logq.gather(-1, t[..., None])[..., 0]
    ent = -(logq.exp() * logq).sum(-1)
    return lp, ent


def cases(B, L, V, device, dtype, T=1.0):
    g = torch.Generator(device="cpu").manual_seed(0)
    z = (torch.randn(B, L, V, generator=g) * 2).to(device=device, dtype=dtype)
    t = torch.randint(0, V, (B, L), generator=g).to(device)
    A = torch.randn(B, L, generator=g).to(device)
    with torch.no_grad():
        old = (eager_logprobs(z, t, T)[0] + 0.05 * torch.randn(B, L, generator=g).to(device))
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    est = Estimator.preset("grpo")
    compiled = torch.compile(eager_logprobs) if device.type == "cuda" else None

    def fwd_bwd(f):
        def run():
            zz = z.detach().requires_grad_()
            out = f(zz)
            out.backward()
        return run

    rows = {}
    lp_bytes = 3 * z.numel() * z.element_size()   # fwd: read once; bwd: read + write gradient
    loss_bytes = 3 * z.numel() * z.element_size()  # fused: two reads (lse pass, gradient pass) + one write
    rows[("token_logprobs", "fastupg")] = (fwd_bwd(lambda zz: sum(x.sum() for x in token_logprobs(
        zz, t, T, return_entropy=True))), lp_bytes)
    rows[("token_logprobs", "eager")] = (fwd_bwd(lambda zz: sum(x.sum() for x in eager_logprobs(zz, t, T))), lp_bytes)
    if compiled is not None:
        rows[("token_logprobs", "torch.compile")] = (fwd_bwd(lambda zz: sum(x.sum() for x in compiled(zz, t, T))),
                                                     lp_bytes)
    kw = dict(advantages=A, old_logp=old, mask=mask)
    rows[("grpo_loss", "fastupg")] = (fwd_bwd(lambda zz: fused_policy_loss(zz, t, est, temperature=T, **kw)[0]),
                                      loss_bytes)
    rows[("grpo_loss", "eager")] = (fwd_bwd(lambda zz: policy_loss(eager_logprobs(zz, t, T)[0], est, **kw)[0]),
                                    loss_bytes)
    if compiled is not None:
        rows[("grpo_loss", "torch.compile")] = (fwd_bwd(lambda zz: policy_loss(compiled(zz, t, T)[0], est, **kw)[0]),
                                                loss_bytes)
    try:  # Liger-Kernel's Triton GRPO loss over logits (liger_kernel.transformers.grpo_loss)
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        def liger(zz):
            # Liger expects (B, L+1, V) logits whose last position is dropped
            logits = torch.cat([zz, zz[:, -1:]], 1)
            out = triton_grpo_loss(logits, old, None, t, A[:, 0], mask.int(), temperature=T, beta=0.0,
                                   eps_low=0.2, eps_high=0.2, inplace=True)
            per_tok = out[0] if isinstance(out, tuple) else out
            return (per_tok * mask).sum() / mask.sum()
        rows[("grpo_loss", "liger")] = (fwd_bwd(liger), loss_bytes)
    except Exception as e:  # not installed, or an API change: say so rather than guess
        print(f"  liger GRPO loss: n/a ({type(e).__name__}: {e})")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes on CPU (smoke test; timings meaningless)")
    ap.add_argument("--csv", default=None, help="write the table as CSV here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if args.quick:
        shapes, dtype = [(2, 16, 1000)], torch.float32
    else:
        if device.type != "cuda":
            sys.exit("no CUDA device: run with --quick for a CPU smoke run")
        shapes, dtype = [(8, 1024, 151936), (4, 8192, 151936)], torch.bfloat16
    bw = copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"copy bandwidth: {f'{bw:.0f} GB/s' if bw else 'n/a'}")
    table = []
    for B, L, V in shapes:
        for (op, impl), (fn, nbytes) in cases(B, L, V, device, dtype).items():
            try:
                ms = bench(fn, device)
                mem = peak_mib(fn, device)
            except torch.OutOfMemoryError:
                ms, mem = float("nan"), "OOM"
            gbs = nbytes / (ms * 1e-3) / 1e9 if ms == ms else float("nan")
            table.append(dict(shape=f"[{B},{L},{V}]", op=op, impl=impl, ms=ms, peak_mib=mem, gb_s=gbs,
                              frac_copy=(gbs / bw) if bw else None))
    base = {(r["shape"], r["op"]): r["ms"] for r in table if r["impl"] == "eager"}
    print(f"{'shape':>20} {'op':>15} {'impl':>14} {'ms':>9} {'vs eager':>9} {'peak MiB':>9} {'GB/s':>7} {'/copy':>6}")
    for r in table:
        sp = base.get((r["shape"], r["op"]), float("nan")) / r["ms"] if r["ms"] == r["ms"] else float("nan")
        mem = r["peak_mib"] if isinstance(r["peak_mib"], str) else ("n/a" if r["peak_mib"] is None
                                                                    else f"{r['peak_mib']:.0f}")
        fc = "n/a" if r["frac_copy"] is None else f"{r['frac_copy']:.2f}"
        print(f"{r['shape']:>20} {r['op']:>15} {r['impl']:>14} {r['ms']:9.3f} {sp:8.2f}x {mem:>9} "
              f"{r['gb_s']:7.0f} {fc:>6}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
