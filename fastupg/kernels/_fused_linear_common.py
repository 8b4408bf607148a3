"""Shared by the fused-linear implementations (fused_linear.py and its _fused_linear_* files): options, dtypes,
the autocast guard. No imports from the implementation files (no cycles)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Chunked impl: bytes of the vocabulary-sized buffers (fp32 logits chunk + gradient rows) live at any time; the
# issue-13 budget is 512 MiB beyond the inputs and gradients, O(N) statistics included. See benchmarks/RESULTS.md.
DEFAULT_CHUNK_BYTES = 384 * 2 ** 20


@dataclass(frozen=True)
class FusedLinearOptions:
    """Everything the autograd Function needs besides tensors (a frozen config instead of a long argument list)."""
    impl: str
    temperature: float = 1.0
    return_entropy: bool = False
    exact: bool = True
    filter_eps: float | None = None   # None: 2^-12 for 16-bit inputs, 2^-20 for fp32 (only used when exact=False)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # chunked impl: bytes of its vocabulary-sized buffers, all of them
    block_n: int = 64
    block_v: int = 128
    block_d: int = 64

    def eps_for(self, dtype: torch.dtype) -> float:
        if self.filter_eps is not None:
            return self.filter_eps
        return 2.0 ** -12 if dtype in (torch.bfloat16, torch.float16) else 2.0 ** -20


def _no_autocast(device: torch.device):
    """The fused-linear loss has ONE precision whatever the caller's autocast state (issue 11): logits accumulated in
    fp32 (fp64 for fp64 inputs) from the stored operands, in the forward and in the backward alike. Under autocast a
    plain `h @ w.T` would give bf16 logits in one pass and fp32 in the other (0.16 nat log-prob errors, 20 % gradient
    errors for confident tokens), so every matmul here runs with autocast off, on the dtype the caller passed."""
    return torch.autocast(device_type=device.type, enabled=False)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
