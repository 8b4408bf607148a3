"""Shared helpers of the logits kernels: dispatch, block-size choice, argument checks.

Dispatch rule (every public function in `fastupg.kernels`): the Triton kernels run when the logits live on a
CUDA device, or when TRITON_INTERPRET=1 is set (Triton's CPU interpreter: slow, used by the tests); otherwise
the plain-PyTorch reference in `fastupg.kernels.reference` runs (same results, N x V memory).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton path should run for tensor `t` (see module docstring)."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class LaunchConfig:
    """Vocabulary block size and warps of the row kernels. One program handles one row (token).

    block_v=None picks min(8192, next_pow2(V)) -- a row of Qwen's 151936 bf16 logits is 297 KiB, so 8192-wide
    blocks give 19 iterations of 16 KiB loads per pass, enough in flight per SM with 16 warps.
    FASTUPG_BLOCK_V (environment) overrides the block size (benchmark sweeps, tests of the masked tail).
    """
    block_v: int | None = None
    num_warps: int | None = None

    def resolve(self, V: int) -> tuple[int, int]:
        env = os.environ.get("FASTUPG_BLOCK_V")
        block = self.block_v or (int(env) if env else None) or min(8192, _next_pow2(V))
        if block & (block - 1) or block < 16:
            raise ValueError(f"block_v must be a power of two >= 16, got {block}")
        warps = self.num_warps or (16 if block >= 8192 else 8 if block >= 2048 else 4)
        return block, warps


DEFAULT_LAUNCH = LaunchConfig()


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_logits_targets(logits, targets, temperature: float):
    """Validate logits (…, V) float and integer targets of shape logits.shape[:-1]; return 2-D views.

    Returns (logits2d (N, V) with unit last-dim stride, targets1d (N,) int64 contiguous, lead shape).
    The range check of targets is O(N) (one device sync).
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"logits must be float32/bfloat16/float16 (float64: reference only), got {logits.dtype}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (N, V) or (B, T, V), got shape {tuple(logits.shape)}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (token ids), got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected {tuple(logits.shape[:-1])} "
                         f"(logits.shape[:-1])")
    if targets.device != logits.device:
        raise ValueError(f"targets is on {targets.device} but logits on {logits.device}")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")
    lead = tuple(logits.shape[:-1])
    l2 = logits.reshape(-1, V)  # a view whenever the leading dims are collapsible
    if l2.numel() and l2.stride(-1) != 1:
        raise ValueError("logits must be contiguous in the last (vocabulary) dimension; "
                         f"got strides {tuple(logits.stride())}")
    t1 = targets.reshape(-1)
    if t1.numel() and bool(((t1 < 0) | (t1 >= V)).any()):
        bad = t1[(t1 < 0) | (t1 >= V)][:5].tolist()
        raise ValueError(f"targets must lie in [0, V={V}); found {bad}")
    return l2, t1.to(torch.int64).contiguous(), lead


def raise_nonfinite(bad_rows: torch.Tensor, what: str = "logits"):
    """Raise the error for rows whose log-sum-exp / target logit came out non-finite (O(N) detection)."""
    rows = bad_rows.nonzero().flatten()[:5].tolist()
    raise ValueError(f"{what} contain non-finite values (nan/inf) or give the target zero probability "
                     f"(first bad rows of the flattened (N, V) view: {rows})")
