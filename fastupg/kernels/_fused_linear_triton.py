"""Triton kernels of the fused linear + log-softmax (fastupg.kernels.fused_linear).

Two kernels, neither of which ever stores a logit in global memory:

* `_fwd_kernel`   one program per block of BLOCK_N rows. It walks the vocabulary in BLOCK_V tiles; each tile of
  logits z = (H W^T + b) / T is built with tl.dot over BLOCK_D slices of D (fp32 accumulation) and folded into an
  online log-sum-exp (running max m, s = sum e^{z-m}, t = sum e^{z-m} (z-m)), the target logit and, when asked,
  the entropy H = log s - t / s. It writes O(N): logp, lse, entropy.

* `_bwd_kernel`   one program per (row block, vocab block) tile over the *compacted* rows (rows whose dL/dl and
  dL/dH are exactly zero are never launched). It recomputes the logits tile, forms
      g = [ dL/dl * (onehot - p) - dL/dH * p * (log p + H) ] / T
  and adds g @ W[vblock] into dH[rows] and g^T @ H[rows] into dW[vblock] with fp32 atomics, D slice by D slice.

Why atomics for both dH and dW (not the split-vocab scheme where one program owns a vocab block of dW): the split
scheme serialises a program over all N/BLOCK_N row blocks (for N = 8k and V = 151936 that is ~1200 programs doing
64-128 sequential tiles each: fine), but dH then needs atomics anyway (every vocab block writes every row) or a
second recompute pass (5 GEMM-equivalents instead of 4). With atomics on both, the backward is exactly three
GEMM-equivalents (recompute, g@W, g^T@H) with full parallelism over N*V/(BLOCK_N*BLOCK_V) tiles, which is what Cut
Cross-Entropy ships. The cost is fp32 accumulation buffers for dH (N x D) and dW (V x D) -- the gradient buffers
themselves -- and atomic traffic of (V/BLOCK_V) * N * D + (N/BLOCK_N) * V * D fp32 adds, i.e. the same bytes as
one extra read of H per vocab block. Grid order: vocab block is the slow index so concurrently running programs
share the W tile (L2 reuse) while writing different dH rows; they contend on the same dW tile, which is the
smaller of the two atomic streams when BLOCK_N >= 64. Not measured: no GPU was available when this was written.

Arithmetic intensity to watch when measuring: a BLOCK_N x BLOCK_V tile does 6 * BLOCK_N * BLOCK_V * D FLOPs (logits,
dH, dW) against (BLOCK_N + BLOCK_V) * D fp32 atomic adds, i.e. 6 * BN * BV / (BN + BV) FLOPs per atomic: 256 at
64 x 128, 512 at 128 x 256. At H100 bf16 rates (~700 TFLOP/s dense) 64 x 128 tiles would need ~2.7e12 atomics/s,
which L2 atomics may not sustain; if the profile shows atomic stalls, the next steps are (1) 128 x 256 backward tiles,
(2) Cut Cross-Entropy's lock-guarded plain read-add-write of a whole BLOCK x BLOCK_D slab (one lock per row/vocab
block instead of one atomic per element), (3) exact=False gradient filtering, which skips both GEMMs of most tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastupg.kernels._fused_linear_common import FusedLinearOptions


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. IEEE: exact fp32 products (fp32 inputs; no TF32). UPCAST: only under
    TRITON_INTERPRET=1, whose tl.dot mishandles bf16 operands (triton 3.9): compute the same product in fp32."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _logits_tile(H, W, B, rows64, cols64, nmask, vmask, D, stride_hn, stride_hd, stride_wv, stride_wd,
                 HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of H[rows] @ W[cols]^T (+ b[cols]): recomputed by the forward and backward."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        h = tl.load(H + rows64[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(W + cols64[None, :] * stride_wv + offs_d[:, None] * stride_wd,
                    mask=vmask[None, :] & dmask[:, None], other=0.0)
        acc = _mm(h, w, acc, IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(B + cols64, mask=vmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fwd_kernel(H, W, B, TGT, LOGP, LSE, ENT,
                N, V, D,
                stride_hn, stride_hd, stride_wv, stride_wd,
                inv_t,
                HAS_BIAS: tl.constexpr, RETURN_ENT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    rows64 = offs_n.to(tl.int64)
    tgt = tl.load(TGT + rows64, mask=nmask, other=0).to(tl.int64)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        vmask = offs_v < V
        cols64 = offs_v.to(tl.int64)
        acc = _logits_tile(H, W, B, rows64, cols64, nmask, vmask, D, stride_hn, stride_hd, stride_wv, stride_wd,
                           HAS_BIAS, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
        z = acc * inv_t
        z = tl.where(vmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        if RETURN_ENT:
            # t = sum e^{z-m} (z-m), re-based from the old max to the new one: (z - m_new) = (z - m_old) + (m_old - m_new)
            # (before the first tile m = -inf and s = 0: use m_new so the product is 0, not -inf * 0 = nan)
            shift = (tl.where(m == float("-inf"), m_new, m) - m_new) * s
            t = alpha * (t + shift) + tl.sum(e * tl.where(vmask[None, :], z - m_new[:, None], 0.0), 1)
        s = s * alpha + tl.sum(e, 1)
        zt += tl.sum(tl.where(cols64[None, :] == tgt[:, None], z, 0.0), 1)
        m = m_new
    lse = m + tl.log(s)
    tl.store(LOGP + rows64, zt - lse, mask=nmask)
    tl.store(LSE + rows64, lse, mask=nmask)
    if RETURN_ENT:
        tl.store(ENT + rows64, tl.log(s) - t / s, mask=nmask)


@triton.jit
def _bwd_kernel(H, W, B, ROWS, TGT, LSE, ENT, GL, GH, DH, DW, DB,
                M, V, D,
                stride_hn, stride_hd, stride_wv, stride_wd, stride_dhn, stride_dwv,
                inv_t, eps,
                HAS_BIAS: tl.constexpr, HAS_GH: tl.constexpr, FILTER: tl.constexpr, IEEE: tl.constexpr,
                UPCAST: tl.constexpr,
                NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    # M = number of compacted rows; ROWS[i] is the original row of compacted row i. TGT/LSE/ENT/GL/GH are compacted.
    pid = tl.program_id(0)
    num_nb = tl.cdiv(M, BLOCK_N)
    pid_v = pid // num_nb
    pid_n = pid % num_nb
    offs_i = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_i < M
    idx64 = offs_i.to(tl.int64)
    rows64 = tl.load(ROWS + idx64, mask=nmask, other=0).to(tl.int64)
    tgt = tl.load(TGT + idx64, mask=nmask, other=0).to(tl.int64)
    lse = tl.load(LSE + idx64, mask=nmask, other=0.0)
    gl = tl.load(GL + idx64, mask=nmask, other=0.0)

    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = offs_v < V
    cols64 = offs_v.to(tl.int64)

    acc = _logits_tile(H, W, B, rows64, cols64, nmask, vmask, D, stride_hn, stride_hd, stride_wv, stride_wd,
                       HAS_BIAS, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
    logp = acc * inv_t - lse[:, None]
    valid = nmask[:, None] & vmask[None, :]
    p = tl.where(valid, tl.exp(logp), 0.0)
    onehot = (cols64[None, :] == tgt[:, None]) & valid
    g = gl[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
    if HAS_GH:
        ent = tl.load(ENT + idx64, mask=nmask, other=0.0)
        gh = tl.load(GH + idx64, mask=nmask, other=0.0)
        g -= gh[:, None] * p * (logp + ent[:, None])
    g = tl.where(valid, g * inv_t, 0.0)

    keep = True
    if FILTER:
        # Cut Cross-Entropy style gradient filtering: a tile whose softmax entries are all < eps and that holds no
        # target contributes < eps * |dL/dl| (+ the same order for the entropy term) per entry: skip its two GEMMs.
        keep = (tl.max(tl.max(p, 1), 0) >= eps) | (tl.sum(tl.sum(onehot.to(tl.int32), 1), 0) > 0)
    if keep:
        if HAS_BIAS:
            tl.atomic_add(DB + cols64, tl.sum(g, 0), mask=vmask)
        if UPCAST:  # interpreter: its fp32 -> bf16 casts are unreliable too; keep g in fp32 there
            gd = g
            gdt = tl.trans(g)
        else:       # GPU: g rounded to the input dtype feeds the tensor cores (as Cut Cross-Entropy does)
            gd = g.to(W.dtype.element_ty)
            gdt = tl.trans(g).to(H.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            if NEED_DH:
                w = tl.load(W + cols64[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                            mask=vmask[:, None] & dmask[None, :], other=0.0)
                dh = _mm(gd, w, tl.zeros((BLOCK_N, BLOCK_D), tl.float32), IEEE, UPCAST)
                tl.atomic_add(DH + rows64[:, None] * stride_dhn + offs_d[None, :], dh,
                              mask=nmask[:, None] & dmask[None, :])
            if NEED_DW:
                h = tl.load(H + rows64[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                            mask=nmask[:, None] & dmask[None, :], other=0.0)
                dw = _mm(gdt, h, tl.zeros((BLOCK_V, BLOCK_D), tl.float32), IEEE, UPCAST)
                tl.atomic_add(DW + cols64[:, None] * stride_dwv + offs_d[None, :], dw,
                              mask=vmask[:, None] & dmask[None, :])


# -- host side: launches (called by fastupg.kernels.fused_linear) --------------------------------------------------
def _triton_forward(h, w, b, tgt, o: FusedLinearOptions):
    N, D = h.shape
    V = w.shape[0]
    logp = torch.empty(N, dtype=torch.float32, device=h.device)
    lse = torch.empty(N, dtype=torch.float32, device=h.device)
    ent = torch.empty(N, dtype=torch.float32, device=h.device) if o.return_entropy else lse
    if N == 0:
        return logp, lse, (ent if o.return_entropy else None)
    grid = (triton_cdiv(N, o.block_n),)
    _fwd_kernel[grid](h, w, b if b is not None else h, tgt, logp, lse, ent,
                      N, V, D, h.stride(0), h.stride(1), w.stride(0), w.stride(1),
                      1.0 / o.temperature,
                      HAS_BIAS=b is not None, RETURN_ENT=o.return_entropy, IEEE=h.dtype == torch.float32, UPCAST=_interp_upcast(h),
                      BLOCK_N=o.block_n, BLOCK_V=o.block_v, BLOCK_D=o.block_d)
    return logp, lse, (ent if o.return_entropy else None)


def _interp_upcast(h) -> bool:
    # the Triton interpreter (CPU tests) computes wrong bf16/fp16 tl.dot products: upcast there, never on a GPU
    return h.device.type != "cuda" and h.dtype != torch.float32


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _triton_backward(h, w, b, rows, tgt, lse, ent, gl, gh, o: FusedLinearOptions, need_dh, need_dw, need_db):
    N, D = h.shape
    V = w.shape[0]
    M = rows.numel()
    f32 = torch.float32
    dH = torch.zeros(N, D, dtype=f32, device=h.device) if need_dh else None
    dW = torch.zeros(V, D, dtype=f32, device=h.device) if need_dw else None
    db = torch.zeros(V, dtype=f32, device=h.device) if need_db else None
    if M > 0:
        has_gh = gh is not None
        grid = (triton_cdiv(M, o.block_n) * triton_cdiv(V, o.block_v),)
        dummy = lse
        _bwd_kernel[grid](h, w, b if b is not None else h, rows, tgt, lse, ent if has_gh else dummy,
                          gl.to(f32), gh.to(f32) if has_gh else dummy,
                          dH if need_dh else dummy, dW if need_dw else dummy, db if need_db else dummy,
                          M, V, D, h.stride(0), h.stride(1), w.stride(0), w.stride(1),
                          D if need_dh else 0, D if need_dw else 0,
                          1.0 / o.temperature, o.eps_for(h.dtype),
                          HAS_BIAS=need_db, HAS_GH=has_gh, FILTER=not o.exact, IEEE=h.dtype == f32, UPCAST=_interp_upcast(h),
                          NEED_DH=need_dh, NEED_DW=need_dw,
                          BLOCK_N=o.block_n, BLOCK_V=o.block_v, BLOCK_D=o.block_d)
    return (dH.to(h.dtype) if need_dh else None), (dW.to(w.dtype) if need_dw else None), db
