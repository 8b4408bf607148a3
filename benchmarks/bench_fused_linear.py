"""Fused-linear policy loss: time and peak memory against PyTorch eager, torch.compile, Liger-Kernel, Cut
Cross-Entropy and the cuBLAS roofline (goals and results: benchmarks/RESULTS.md).

    python benchmarks/bench_fused_linear.py                       # GPU: N in {8k, 32k, 128k}, D in {1536, 3584}
    python benchmarks/bench_fused_linear.py --quick               # CPU smoke run: tiny sizes, torch paths only
    python benchmarks/bench_fused_linear.py --n 8192 --d 1536 --methods fastupg-triton gemm
    python benchmarks/bench_fused_linear.py --out DIR             # DIR/fused_linear.{csv,json,txt} + plots (PNG)
    pytest benchmarks/test_bench_fused_linear.py --benchmark-json out.json   # the same rows as a pytest-benchmark suite
    python benchmarks/plot_bench.py out.json --out DIR            # time and peak memory vs N per method (PNG)

Each row: one method at one (N, D), V = 151936, bf16, the DAPO estimator (token-mean, clip 0.2/0.28) on sequences of
--seq-len tokens with one advantage per sequence and old_logp = the current log-probs (the first update of a
batch: no token is clipped, so no row is skipped and every method does the full work).

    fwd_ms, bwd_ms, total_ms   triton.testing.do_bench (CUDA) / median of perf_counter runs (CPU); fwd is timed under
                               torch.no_grad (what an old/ref log-prob pass costs), bwd = total - fwd. For
                               fastupg-chunked the training forward already forms the gradient (one pass), so only
                               total_ms compares like with like there.
    peak_extra_mib             peak allocation during forward+backward beyond the inputs and the dH/dW buffers
                               (torch.cuda.max_memory_allocated on GPU; bytes requested through the dispatcher on CPU)
    x_gemm                     total / total of the three bare GEMMs of the same shapes (logits, dH, dW): the roofline
    x_liger                    Liger-Kernel total / this total (speed-up over LigerFusedLinearGRPOLoss)
    x_chunked                  fastupg-chunked total / this total (e.g. the atomic-free split-pass fastupg-triton
                               against the default impl, same run)

Methods: fastupg-{triton,chunked,torch}, eager (logits + log_softmax + fastupg.policy_loss), compile (the same under
torch.compile), liger (LigerFusedLinearGRPOLoss, loss_type='dapo'), cce (cut_cross_entropy.linear_cross_entropy: the
SFT loss; compare with fastupg-*-sft rows), gemm. A method that runs out of memory is reported as OOM; a missing
package is reported as 'n/a' with the reason. No numbers are claimed here: run it on the GPU and paste the table into
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
import weakref

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fastupg.estimator import Estimator, policy_loss  # noqa: E402
from fastupg.kernels.fused_linear import (DEFAULT_CHUNK_BYTES, fused_linear_logprobs,  # noqa: E402
                                          fused_linear_policy_loss)


# -- problem ----------------------------------------------------------------------------------------------------------
class Problem:
    def __init__(self, N, D, V, dtype, device, seq_len, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.N, self.D, self.V = N, D, V
        T = min(seq_len, N)
        B = N // T
        self.N = B * T
        self.shape = (B, T)
        # lm_head-like scales: logits with a std of a few units
        self.hidden = torch.randn(B, T, D, generator=g).to(device=device, dtype=dtype)
        self.weight = (torch.randn(V, D, generator=g) / math.sqrt(D) * 2.0).to(device=device, dtype=dtype)
        self.targets = torch.randint(0, V, (B, T), generator=g).to(device)
        self.adv_seq = torch.randn(B, generator=g).to(device)
        self.advantages = self.adv_seq[:, None].expand(B, T).contiguous()
        self.mask = torch.ones(B, T, dtype=torch.bool, device=device)
        with torch.no_grad():
            impl = "chunked" if device != "cuda" else None
            self.old_logp = fused_linear_logprobs(self.hidden, self.weight, self.targets, impl=impl).float()
        self.est = Estimator.preset("dapo")
        self.sft = Estimator.preset("sft")

    def leaves(self):
        h = self.hidden.detach().requires_grad_()
        w = self.weight.detach().requires_grad_()
        return h, w

    def input_bytes(self):
        return sum(t.numel() * t.element_size() for t in
                   (self.hidden, self.weight, self.targets, self.advantages, self.mask, self.old_logp, self.adv_seq))

    def grad_bytes(self):
        return (self.hidden.numel() + self.weight.numel()) * self.hidden.element_size()


# -- methods: each returns (forward() -> loss, needs leaves) ----------------------------------------------------------
def m_fastupg(impl, sft=False, chunk_bytes=DEFAULT_CHUNK_BYTES, one_pass=None, split=None, **knobs):
    """knobs: module settings of fastupg.kernels._fused_linear_chunked (e.g. ONE_PASS_SUBCHUNKS); split: settings
    of the fused loss kernel (fastupg.kernels._logits_triton.SPLIT, e.g. one_launch), which the one-pass path
    launches in its forward: variant rows."""
    if knobs or split:
        import fastupg.kernels._fused_linear_chunked as fl  # noqa: PLC0415  (the chunked impl's module settings)
        from fastupg.kernels._logits_triton import SPLIT  # noqa: PLC0415

        def make_knobbed(p: Problem):
            fwd, leaves = make(p)

            def run():
                old, old_split = {k: getattr(fl, k) for k in knobs}, dict(SPLIT)
                for k, v in knobs.items():
                    setattr(fl, k, v)
                SPLIT.update(split or {})
                try:
                    return fwd()
                finally:
                    for k, v in old.items():
                        setattr(fl, k, v)
                    SPLIT.update(old_split)
            return run, leaves

    def make(p: Problem):
        h, w = p.leaves()
        if sft:
            return (lambda: fused_linear_policy_loss(h, w, p.targets, p.sft, advantages=1.0, mask=p.mask,
                                                     impl=impl, chunk_bytes=chunk_bytes)[0]), (h, w)
        return (lambda: fused_linear_policy_loss(h, w, p.targets, p.est, advantages=p.advantages,
                                                 old_logp=p.old_logp, mask=p.mask, impl=impl,
                                                 chunk_bytes=chunk_bytes, one_pass=one_pass)[0]), (h, w)
    return make_knobbed if (knobs or split) else make


def _eager_loss(h, w, targets, est, advantages, old_logp, mask):
    logits = (h @ w.t()).float()
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    return policy_loss(logp, est, advantages=advantages, old_logp=old_logp, mask=mask)[0]


def m_eager(compiled=False):
    def make(p: Problem):
        h, w = p.leaves()
        fn = torch.compile(_eager_loss) if compiled else _eager_loss
        return (lambda: fn(h, w, p.targets, p.est, p.advantages, p.old_logp, p.mask)), (h, w)
    return make


def m_liger(p: Problem):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: PLC0415
    h, w = p.leaves()
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.28,
                                       loss_type="dapo")

    def fwd():
        out = loss_fn(h, w, p.targets, p.mask.long(), p.adv_seq, old_per_token_logps=p.old_logp)
        return out[0] if isinstance(out, tuple) else out
    return fwd, (h, w)


def m_cce(p: Problem):
    from cut_cross_entropy import linear_cross_entropy  # noqa: PLC0415
    h, w = p.leaves()
    return (lambda: linear_cross_entropy(h, w, p.targets)), (h, w)


class _Gemm:
    """The three bf16 GEMMs of a fused-linear loss, outputs in the input dtype (the roofline)."""

    def __init__(self, p: Problem):
        self.h = p.hidden.reshape(-1, p.D)
        self.w = p.weight
        self.buf = None

    def fwd(self):
        self.buf = self.h @ self.w.t()          # N x V logits
        return self.buf

    def bwd(self):
        dh = self.buf @ self.w                  # N x D
        dw = self.buf.t() @ self.h              # V x D
        return dh, dw


METHODS = {
    "fastupg-triton": m_fastupg("triton"),
    "fastupg-chunked": m_fastupg("chunked"),
    "fastupg-chunked-768m": m_fastupg("chunked", chunk_bytes=768 * 2 ** 20),  # twice the default buffers
    "fastupg-chunked-k1": m_fastupg("chunked", ONE_PASS_SUBCHUNKS=1),  # gradient GEMMs once per fp32 chunk
    "fastupg-chunked-k6": m_fastupg("chunked", ONE_PASS_SUBCHUNKS=6),
    # the two-pass path (GSPO, retain_graph): O(N) forward, backward recomputes the logits (4 GEMMs)
    "fastupg-chunked-2pass": m_fastupg("chunked", one_pass=False),
    # the fused loss kernel's one-launch form (fp32 logits chunk read from HBM once; 2026-12-07, not yet measured)
    "fastupg-chunked-1launch": m_fastupg("chunked", split=dict(one_launch=True, chunk=1024, warps=2)),
    "fastupg-torch": m_fastupg("torch"),
    "fastupg-triton-sft": m_fastupg("triton", sft=True),
    "fastupg-chunked-sft": m_fastupg("chunked", sft=True),
    "eager": m_eager(False),
    "compile": m_eager(True),
    "liger": m_liger,
    "cce": m_cce,
    "gemm": None,
}
GPU_ONLY = {"fastupg-triton", "fastupg-triton-sft", "liger", "cce", "compile"}
QUICK = ("fastupg-chunked", "fastupg-torch", "eager", "gemm")  # --quick (CPU, CI): one row per kind of path
# slow or memory-hungry peers: skipped above --slow-max-n tokens so that one GPU call covers every size
# (fastupg-triton is timed at every size since its backward became atomic-free split passes: the peer of the default)
SLOW = {"fastupg-triton-sft", "fastupg-torch", "eager", "compile", "liger", "cce",
        "fastupg-chunked-sft", "fastupg-chunked-2pass", "fastupg-chunked-1launch"}  # (-sft: the peer of cce)


# -- measurement ------------------------------------------------------------------------------------------------------
class _CpuAllocCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak live bytes of new storages created by torch ops (CPU stand-in for max_memory_allocated)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.ptrs = 0, 0, set()

    def _free(self, ptr, n):
        self.ptrs.discard(ptr)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_flatten
        ins = {a.untyped_storage().data_ptr() for a in flat((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in flat(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ptr, n = st.data_ptr(), st.nbytes()
                if n and ptr not in ins and ptr not in self.ptrs:
                    self.ptrs.add(ptr)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, ptr, n)
        return out


def _time(fn, cuda, reps):
    if cuda:
        import triton.testing  # noqa: PLC0415
        return triton.testing.do_bench(fn, warmup=3, rep=reps * 20)
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_one(name, p: Problem, cuda, reps):
    row = dict(method=name, N=p.N, D=p.D, V=p.V, fwd_ms=None, bwd_ms=None, total_ms=None, peak_extra_mib=None,
               status="ok")
    try:
        if name == "gemm":
            g = _Gemm(p)

            def fwd():
                g.fwd()

            def total():
                g.fwd()
                g.bwd()
            grads = p.grad_bytes()  # dH and dW outputs of the GEMMs are the gradient buffers
        else:
            fwd_fn, (h, w) = METHODS[name](p)

            def fwd():
                with torch.no_grad():
                    fwd_fn()

            def total():
                h.grad = w.grad = None
                fwd_fn().backward()
            grads = p.grad_bytes()
        # memory (one separate run)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            total()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            if name != "gemm":
                h.grad = w.grad = None
        else:
            with _CpuAllocCounter() as c:
                total()
            peak = c.peak
            if name != "gemm":
                h.grad = w.grad = None
        row["peak_extra_mib"] = max(0.0, (peak - grads) / 2 ** 20)
        row["fwd_ms"] = _time(fwd, cuda, reps)
        row["total_ms"] = _time(total, cuda, reps)
        row["bwd_ms"] = row["total_ms"] - row["fwd_ms"]
        if name == "gemm":
            g.buf = None
    except ImportError as e:
        row["status"] = f"n/a ({e.name or e} not installed)"
    except Exception as e:  # noqa: BLE001  (torch.cuda.OutOfMemoryError is a RuntimeError)
        row["status"] = "OOM" if (_is_oom(e) or isinstance(e, MemoryError)) else \
            f"error ({type(e).__name__}: {str(e).splitlines()[0][:80]})"  # a peer's failure must not stop the run
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--d", type=int, nargs="+", default=[1536, 3584])
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (advantage granularity)")
    ap.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                    help="default: every method (with --quick: one row per kind of path)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--csv", default=None, help="write the rows as CSV here (nothing is written into the source "
                    "tree unless asked)")
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run (torch paths only)")
    ap.add_argument("--out", default=None, help="folder for fused_linear.csv/.json/.txt and the PNG plots "
                    "(overrides --csv/--json)")
    ap.add_argument("--json", default=None, help="pytest-benchmark-shaped JSON of the rows (plot_bench.py reads it)")
    ap.add_argument("--slow-max-n", type=int, default=None,
                    help=f"skip the slow peers {sorted(SLOW)} above this many tokens")
    a = ap.parse_args(argv)
    if a.out:
        a.csv, a.json = os.path.join(a.out, "fused_linear.csv"), os.path.join(a.out, "fused_linear.json")
    cuda = torch.cuda.is_available() and not a.quick
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    if a.quick:
        a.n, a.d, a.v, a.seq_len, a.reps = [64, 128], [40], 1031, 64, 1
        a.methods = list(QUICK) if a.methods is None else [m for m in a.methods if m not in GPU_ONLY]
    elif a.methods is None:
        a.methods = list(METHODS)
    if not cuda and not a.quick:
        print("no CUDA device: GPU-only methods are skipped (use --quick for a fast smoke run)", file=sys.stderr)
        a.methods = [m for m in a.methods if m not in GPU_ONLY]
    device = "cuda" if cuda else "cpu"

    rows = []
    for D in a.d:
        for N in a.n:
            try:
                p = Problem(N, D, a.v, dtype, device, a.seq_len)
            except (RuntimeError, MemoryError) as e:
                if not (isinstance(e, MemoryError) or _is_oom(e)):
                    raise
                rows += [dict(method=m, N=N, D=D, V=a.v, status="OOM (inputs)") for m in a.methods]
                continue
            block = []
            for m in a.methods:  # one line per method as it finishes: a run cut short still shows what it measured
                if a.slow_max_n is not None and m in SLOW and N > a.slow_max_n:
                    block.append(dict(method=m, N=p.N, D=D, V=a.v, status=f"skipped (N > --slow-max-n)"))
                    continue
                block.append(run_one(m, p, cuda, a.reps))
                print(f"# N={N} D={D} {block[-1]}", flush=True)
            gemm = next((r for r in block if r["method"] == "gemm" and r.get("total_ms")), None)
            liger = next((r for r in block if r["method"] == "liger" and r.get("total_ms")), None)
            chunked = next((r for r in block if r["method"] == "fastupg-chunked" and r.get("total_ms")), None)
            for r in block:
                r["x_gemm"] = r["total_ms"] / gemm["total_ms"] if (gemm and r.get("total_ms")) else None
                r["x_liger"] = liger["total_ms"] / r["total_ms"] if (liger and r.get("total_ms")) else None
                r["x_chunked"] = chunked["total_ms"] / r["total_ms"] if (chunked and r.get("total_ms")) else None
                print(_fmt(r), flush=True)
            rows += block
            del p

    print("\n" + _table(rows))
    device = torch.cuda.get_device_name() if cuda else "cpu"
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "fused_linear.txt"), "w") as f:
            f.write(f"# {device} torch {torch.__version__} dtype {a.dtype} V {a.v}\n{_table(rows)}\n")
    if a.json:
        write_json(rows, a.json, device, a.dtype)
        if a.out:
            from plot_bench import plot  # noqa: PLC0415  (benchmarks/ is on sys.path when run as a script)
            for png in plot(a.json, a.out):
                print(f"wrote {png}")
    if a.csv:
        os.makedirs(os.path.dirname(a.csv) or ".", exist_ok=True)
        cols = ["method", "N", "D", "V", "fwd_ms", "bwd_ms", "total_ms", "peak_extra_mib", "x_gemm", "x_liger",
                "x_chunked", "status"]
        with open(a.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            wr.writeheader()
            wr.writerows(rows)
        print(f"wrote {a.csv}  (device: {device}, dtype {a.dtype})")
    return rows


def write_json(rows, path, device, dtype):
    """The rows in the shape of pytest-benchmark's JSON (benchmarks[].{group,name,params,stats,extra_info}), so one
    plotting script reads both this script's output and `pytest benchmarks/ --benchmark-json`."""
    import datetime  # noqa: PLC0415
    import json  # noqa: PLC0415
    import platform  # noqa: PLC0415
    bench = []
    for r in rows:
        t = r.get("total_ms")
        bench.append(dict(group=f"fused_linear D={r['D']}", name=f"fused_linear[{r['method']}-{r['N']}-{r['D']}]",
                          params=dict(method=r["method"], N=r["N"], D=r["D"]),
                          stats=None if t is None else dict(median=t / 1e3, min=t / 1e3, mean=t / 1e3, rounds=1),
                          extra_info=dict(r, device=device, dtype=dtype, torch=torch.__version__)))
    doc = dict(machine_info=dict(node=platform.node(), device=device), commit_info={}, benchmarks=bench,
               datetime=datetime.datetime.now(datetime.timezone.utc).isoformat(), version="fastupg-bench")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"wrote {path}")


def _f(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def _fmt(r):
    return (f"{r['method']:>20} N={r['N']:>7} D={r['D']:>5}  fwd {_f(r.get('fwd_ms'))} ms  bwd {_f(r.get('bwd_ms'))} ms"
            f"  total {_f(r.get('total_ms'))} ms  peak+ {_f(r.get('peak_extra_mib'), 1)} MiB  {r['status']}")


def _table(rows):
    hdr = f"{'method':>20} {'N':>7} {'D':>5} {'fwd ms':>9} {'bwd ms':>9} {'total ms':>9} {'peak+ MiB':>10} " \
          f"{'x gemm':>7} {'x liger':>8} {'x chunked':>9}  status"
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        lines.append(f"{r['method']:>20} {r['N']:>7} {r['D']:>5} {_f(r.get('fwd_ms')):>9} {_f(r.get('bwd_ms')):>9} "
                     f"{_f(r.get('total_ms')):>9} {_f(r.get('peak_extra_mib'), 1):>10} {_f(r.get('x_gemm')):>7} "
                     f"{_f(r.get('x_liger')):>8} {_f(r.get('x_chunked')):>9}  {r['status']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
