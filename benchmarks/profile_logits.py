"""Where the time of one fused_policy_loss step goes on this GPU: kernel time vs everything around it.

    python benchmarks/profile_logits.py            # [8, 1024, 151936] bf16, GRPO; torch.profiler tables

For each op (fastupg token_logprobs fwd+bwd, fastupg fused_policy_loss fwd+bwd, Liger triton_grpo_loss if
importable) prints the wall time of one step (CUDA events, after warm-up), the sum of its GPU kernel times, and the
kernels that take the most GPU time. wall - kernels = launch overhead, host syncs and idle gaps.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from fastupg.estimator import Estimator  # noqa: E402
from fastupg.kernels import fused_policy_loss, token_logprobs  # noqa: E402


def main():
    B, T, V = 8, 1024, 151936
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g, device=dev) * 2).bfloat16()
    y = torch.randint(0, V, (B, T), generator=g, device=dev)
    adv = torch.randn(B, T, generator=g, device=dev)
    mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    with torch.no_grad():
        old = token_logprobs(logits, y) + 0.1 * torch.randn(B, T, generator=g, device=dev)
    est = Estimator.preset("grpo")

    def logp_step():
        z = logits.detach().requires_grad_()
        token_logprobs(z, y).sum().backward()

    def fused_step():
        z = logits.detach().requires_grad_()
        fused_policy_loss(z, y, est, advantages=adv, old_logp=old, mask=mask)[0].backward()

    ops = {"fastupg token_logprobs": logp_step, "fastupg fused_policy_loss": fused_step}
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss  # noqa: PLC0415
        pad = torch.cat([logits, logits[:, -1:]], 1)

        def liger_step():
            z = pad.detach().requires_grad_()
            out = triton_grpo_loss(z, old, None, y, adv[:, 0], mask, temperature=1.0, beta=0.0, eps_low=0.2,
                                   eps_high=0.2, inplace=False)
            per_tok = out[0] if isinstance(out, (tuple, list)) else out
            ((per_tok * mask).sum() / mask.sum()).backward()
        ops["liger triton_grpo_loss"] = liger_step
    except ImportError:
        print("# liger_kernel not importable")

    for name, fn in ops.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            fn()
        e.record()
        torch.cuda.synchronize()
        wall = s.elapsed_time(e) / 10
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        ev = [x for x in prof.key_averages() if x.device_type == torch.autograd.DeviceType.CUDA]
        kern = sum(x.self_device_time_total for x in ev) / 1e3
        n_kern = sum(x.count for x in ev)
        print(f"\n== {name}: wall {wall:.3f} ms/step, GPU kernels {kern:.3f} ms in {n_kern} launches")
        for x in sorted(ev, key=lambda x: -x.self_device_time_total)[:6]:
            print(f"   {x.self_device_time_total / 1e3:8.3f} ms  x{x.count:<3} {x.key[:90]}")


if __name__ == "__main__":
    main()
