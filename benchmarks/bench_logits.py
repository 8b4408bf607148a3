"""Benchmark of the logits-input kernels (goals and measured results: benchmarks/RESULTS.md).

Compares, fwd+bwd, at [8, 1024, 151936] and [4, 8192, 151936] bf16:
  token_logprobs (fastupg Triton)  vs  PyTorch eager log_softmax+gather  vs  torch.compile of the same
  fused_policy_loss (grpo preset)  vs  eager / torch.compile (fastupg.policy_loss on log_softmax)
                                   vs  Liger's triton_grpo_loss (if liger_kernel is importable)
Reports time (triton.testing.do_bench, ms), peak memory beyond the inputs (MiB) and achieved bandwidth
(bytes the op must move / time) as a fraction of a measured device-to-device copy.

    python benchmarks/bench_logits.py            # GPU: the sizes above
    python benchmarks/bench_logits.py --quick    # tiny sizes; on CPU only the torch paths run (smoke test)
No numbers are claimed here: run it on the GPU and paste the table into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import fastupg  # noqa: E402
from fastupg.estimator import Estimator  # noqa: E402
from fastupg.kernels import fused_policy_loss, token_logprobs  # noqa: E402


def _bench(fn, cuda: bool, reps: int = 20) -> float:
    if cuda:
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=5, rep=100))
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def _peak(fn, cuda: bool) -> float:
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth(nbytes: int, dev) -> float:
    """Measured device-to-device copy bandwidth (bytes/s; read + write counted)."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    b = torch.empty_like(a)
    ms = _bench(lambda: b.copy_(a), dev.type == "cuda")
    return 2 * nbytes / (ms * 1e-3)


def make(B, T, V, dtype, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)  # generated on the device: 5e9 logits take minutes on a CPU
    logits = (torch.randn(B, T, V, generator=g, device=dev, dtype=torch.float32) * 2).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g, device=dev)
    adv = torch.randn(B, T, generator=g, device=dev)
    with torch.no_grad():
        old = token_logprobs(logits, y) if dev.type == "cuda" else \
            torch.log_softmax(logits.float(), -1).gather(-1, y[..., None])[..., 0]
    old = old + 0.1 * torch.randn(B, T, generator=g, device=dev)
    mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    return logits, y, adv, old, mask


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile variants")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sizes = [(2, 64, 1000)] if args.quick else [(8, 1024, 151936), (4, 8192, 151936)]
    dtype = torch.bfloat16
    triton_ok = cuda or os.environ.get("TRITON_INTERPRET") == "1"
    est = Estimator.preset("grpo")

    def eager_logp(z, y):
        return torch.log_softmax(z.float(), -1).gather(-1, y[..., None])[..., 0]

    def eager_loss(z, y, adv, old, mask):
        return fastupg.policy_loss(eager_logp(z, y), est, advantages=adv, old_logp=old, mask=mask)[0]

    compiled_logp = compiled_loss = None
    if not args.no_compile:
        try:
            compiled_logp = torch.compile(eager_logp)
            compiled_loss = torch.compile(eager_loss)
        except Exception as e:  # noqa: BLE001
            print(f"# torch.compile unavailable: {e}")
    liger = None
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss as liger  # noqa: F811
    except Exception:  # noqa: BLE001
        print("# liger_kernel not importable: Liger rows skipped")

    rows = []
    for (B, T, V) in sizes:
        logits, y, adv, old, mask = make(B, T, V, dtype, dev)
        nbytes = logits.numel() * logits.element_size()
        bw = copy_bandwidth(nbytes, dev)
        # bytes the op must move: logp fwd+bwd = read (fwd) + read + write (bwd); fused loss: read x2 + write
        need = 3 * nbytes

        def run(name, op, kind):
            def step():
                z = logits.detach().requires_grad_()
                out = op(z)
                out.sum().backward() if out.dim() else out.backward()
            try:
                step()
                ms = _bench(step, cuda)
                mem = _peak(step, cuda)
            except Exception as e:  # noqa: BLE001
                print(f"# {name} failed at {(B, T, V)}: {type(e).__name__}: {str(e)[:200]}")
                return
            rows.append((f"{B}x{T}x{V}", kind, name, ms, mem, need / (ms * 1e-3) / bw))

        run("eager", lambda z: eager_logp(z, y), "logp")
        if compiled_logp is not None and cuda:
            run("torch.compile", lambda z: compiled_logp(z, y), "logp")
        if triton_ok:
            run("fastupg", lambda z: token_logprobs(z, y), "logp")
        run("eager", lambda z: eager_loss(z, y, adv, old, mask), "grpo")
        if compiled_loss is not None and cuda:
            run("torch.compile", lambda z: compiled_loss(z, y, adv, old, mask), "grpo")
        if triton_ok:
            run("fastupg fused", lambda z: fused_policy_loss(z, y, est, advantages=adv, old_logp=old,
                                                              mask=mask)[0], "grpo")
        if liger is not None and cuda:
            # Liger's kernel reads logits[:, :-1]: give it a (B, T+1, V) tensor
            pad = torch.cat([logits, logits[:, -1:]], 1)

            def liger_op(z):
                out = liger(z, old, None, y, adv[:, 0], mask, temperature=1.0, beta=0.0,
                            eps_low=0.2, eps_high=0.2, inplace=True)
                per_tok = out[0] if isinstance(out, (tuple, list)) else out
                return (per_tok * mask).sum() / mask.sum()

            def run_liger():
                def step():
                    z = pad.detach().requires_grad_()
                    liger_op(z).backward()
                try:
                    step()
                    ms, mem = _bench(step, cuda), _peak(step, cuda)
                    rows.append((f"{B}x{T}x{V}", "grpo", "liger triton_grpo_loss", ms, mem,
                                 need / (ms * 1e-3) / bw))
                except Exception as e:  # noqa: BLE001
                    print(f"# liger failed: {type(e).__name__}: {str(e)[:200]}")
            run_liger()
        if triton_ok:  # last: the in-place backward overwrites the logits buffer (the values change, not the work)
            run("fastupg inplace", lambda z: token_logprobs(z, y, inplace_backward=True), "logp")
            run("fastupg fused inplace", lambda z: fused_policy_loss(z, y, est, advantages=adv, old_logp=old,
                                                                      mask=mask, inplace_backward=True)[0], "grpo")
        del logits

    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu (torch paths only, times meaningless)'}")
    print(f"{'size':>16} {'op':>5} {'impl':>24} {'ms':>9} {'peak MiB':>9} {'BW/copy':>8}")
    for r in rows:
        print(f"{r[0]:>16} {r[1]:>5} {r[2]:>24} {r[3]:9.3f} {r[4]:9.1f} {r[5]:8.2f}")
    return rows


if __name__ == "__main__":
    main()
