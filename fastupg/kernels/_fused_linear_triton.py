"""Triton kernels of the fused linear + log-softmax (fastupg.kernels.fused_linear), impl="triton".

No kernel ever stores a logit in global memory, and no kernel uses atomics: every output tile is owned by exactly
one program (the split-pass scheme of issue 13; Cut Cross-Entropy's own backward is one kernel with lock-guarded
adds, Liger's is chunked cuBLAS).

* `_fwd_kernel`   one program per block of block_n rows. It walks the vocabulary in block_v tiles; each tile of
  logits z = (H W^T + b) / T is built with tl.dot over BLOCK_D slices of D (fp32 accumulation) and folded into an
  online log-sum-exp (running max m, s = sum e^{z-m}, t = sum e^{z-m} (z-m)), the target logit and, when asked,
  the entropy H = log s - t / s. It writes O(N): logp, lse, entropy.

* backward, over the *compacted* rows only (rows whose dL/dl and dL/dH are exactly zero are never visited), in two
  passes that each recompute the logits tiles and form
      g = [ dL/dl * (onehot - p) - dL/dH * p * (log p + H) ] / T          (rows x vocabulary tile, fp32)
  - `_dh_kernel`  program per block of block_n rows, loop over vocabulary tiles of block_v:  dH[rows] += g @ W[tile]
  - `_dw_kernel`  program per block of block_n vocab entries, loop over row tiles of block_v:
                  dW[vocab] += g^T @ H[tile], db[vocab] += sum of g over the rows
  Both passes own blocks of the same size (block_n x D) and walk the other dimension in the same order, so that
  concurrently running programs share the streamed W (dH pass) or H (dW pass) tiles in L2.
  Cost: 5 GEMM-equivalents (forward, 2 x recompute, dH, dW) against the 3 of a bare forward + backward.

Accumulation. A program's output block (block_n x D) does not fit in registers for D in the thousands, so it is
accumulated D slice by D slice by read-modify-write in global memory, in fp32, by its only owner (a barrier orders
each store before the next load):
  - fp32 gradients: straight in the output buffer (`in place`), one program per owner block;
  - 16-bit gradients: in a per-program fp32 slab (block_n x D) of a scratch buffer, rounded once into the output
    when the block is done (no fp32 copy of dH or dW). The grid is then *persistent*: P programs (P chosen so that
    the scratch stays within SCRATCH_BYTES, 48 MiB) each walk the owner blocks pid, pid + P, ... reusing their slab.
    Memory beyond the inputs and the gradient outputs: O(N) statistics + the scratch (<= 48 MiB), whatever N and V.
  The trade-off: with block_n = 64, bf16, each pass runs 128 programs at D = 1536 and 54 at D = 3584 (an H100 has
  132 SMs). Not yet measured; if the profile shows idle SMs at large D, the knob is exactly this one (a smaller
  owner block, or a larger scratch budget against the 64 MiB goal of issue 13).

Gradient filtering (exact=False), with a bound that holds whatever the distribution: a tile of g is skipped (both
GEMMs of the tile; in the dW pass also its bias contribution) iff it holds no target and, for every row, the softmax
mass in the tile is < filter_eps / n, n = the number of vocabulary tiles of the pass. A row therefore loses less than
filter_eps of probability mass in each pass, and its gradient row g changes by less than
    filter_eps * (|dL/dl| + |dL/dH| * (H + log(V / filter_eps))) / T           (L1 norm)
(sum of p_j |log p_j + H| over the skipped j, with their total mass < filter_eps). Cut Cross-Entropy's rule (every
entry < filter_eps; the chunked impl's) bounds each skipped entry but not their sum: a flat distribution over a
large vocabulary would lose almost all of its mass. The number of skipped tiles per owner block is written to a
small int32 buffer (`last_skipped`, for tests and profiling).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastupg.kernels._fused_linear_common import FusedLinearOptions

SCRATCH_BYTES = 48 * 2 ** 20   # fp32 slabs of the persistent grid (16-bit gradients only)
ACCUMULATE_IN_OUTPUT = True    # fp32 gradients accumulate in the output buffer; False forces the slab path (tests)
last_skipped: dict = {}        # exact=False: {"dh": int32 per row block, "dw": int32 per vocab block} of the last call


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
def _span(start, n, BLOCK: tl.constexpr):
    """int64 offsets start .. start + BLOCK - 1 and their mask (< n): one tile of rows or vocabulary columns."""
    offs = start + tl.arange(0, BLOCK)
    return offs.to(tl.int64), offs < n


@triton.jit
def _logits_tile(H, W, B, rows64, cols64, nmask, vmask, D, stride_hn, stride_wv,
                 HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of H[rows] @ W[cols]^T (+ b[cols]): recomputed by the forward and both passes."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        h = tl.load(H + rows64[:, None] * stride_hn + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(W + cols64[None, :] * stride_wv + offs_d[:, None],
                    mask=vmask[None, :] & dmask[:, None], other=0.0)
        acc = _mm(h, w, acc, IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(B + cols64, mask=vmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _row_stats(idx64, nmask, ROWS, TGT, LSE, ENT, GL, GH, HAS_GH: tl.constexpr):
    """Per-row inputs of the backward at compacted indices idx64: original row, target, lse, dL/dl (entropy, dL/dH)."""
    rows64 = tl.load(ROWS + idx64, mask=nmask, other=0).to(tl.int64)
    tgt = tl.load(TGT + idx64, mask=nmask, other=0).to(tl.int64)
    lse = tl.load(LSE + idx64, mask=nmask, other=0.0)
    gl = tl.load(GL + idx64, mask=nmask, other=0.0)
    if HAS_GH:
        ent = tl.load(ENT + idx64, mask=nmask, other=0.0)
        gh = tl.load(GH + idx64, mask=nmask, other=0.0)
    else:
        ent = lse
        gh = gl
    return rows64, tgt, lse, gl, ent, gh


@triton.jit
def _grad_tile(z, tgt, lse, gl, ent, gh, cols64, nmask, vmask, inv_t, tile_eps,
               HAS_GH: tl.constexpr, FILTER: tl.constexpr):
    """g = dL/dz for a recomputed (BLOCK_N, BLOCK_V) logits tile z (before 1/T), and whether it is kept (exact=False:
    skipped iff no target lies in the tile and every row's softmax mass in it is < tile_eps)."""
    logp = z * inv_t - lse[:, None]
    valid = nmask[:, None] & vmask[None, :]
    p = tl.where(valid, tl.exp(logp), 0.0)
    onehot = (cols64[None, :] == tgt[:, None]) & valid
    g = gl[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
    if HAS_GH:
        g -= gh[:, None] * p * (logp + ent[:, None])
    g = tl.where(valid, g * inv_t, 0.0)
    keep = True
    if FILTER:
        keep = (tl.max(tl.sum(p, 1), 0) >= tile_eps) | (tl.sum(tl.sum(onehot.to(tl.int32), 1), 0) > 0)
    return g, keep


@triton.jit
def _operand(g, PTR, UPCAST: tl.constexpr):
    """g as a tl.dot operand: rounded to the inputs' dtype on a GPU (tensor cores, as Cut Cross-Entropy does); kept
    fp32 under the interpreter (UPCAST), whose fp32 -> bf16 casts are unreliable."""
    if UPCAST:
        out = g
    else:
        out = g.to(PTR.dtype.element_ty)
    return out


@triton.jit
def _add_product(ACC, acc_rows64, omask, a, X, xrows64, xmask, stride_x, D,
                 IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr):
    """ACC[acc_rows] += a @ X[xrows], D slice by D slice: fp32 read-modify-write by the rows' only owner (the dH pass:
    a = g, X = W; the dW pass: a = g^T, X = H). The barrier orders each store before the next load of the same
    addresses by other threads of this program (load and store may use different layouts)."""
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        x = tl.load(X + xrows64[:, None] * stride_x + offs_d[None, :], mask=xmask[:, None] & dmask[None, :], other=0.0)
        acc = ACC + acc_rows64[:, None] * D + offs_d[None, :]
        amask = omask[:, None] & dmask[None, :]
        tl.store(acc, _mm(a, x, tl.load(acc, mask=amask, other=0.0), IEEE, UPCAST), mask=amask)
        tl.debug_barrier()


@triton.jit
def _slab_fill(SLAB, OUT, slab_rows64, out_rows64, omask, D, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
               FINISH: tl.constexpr):
    """FINISH=False: zero the slab rows (start of an owner block). FINISH=True: round the slab rows into OUT."""
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = omask[:, None] & (offs_d < D)[None, :]
        slab = SLAB + slab_rows64[:, None] * D + offs_d[None, :]
        if FINISH:
            acc = tl.load(slab, mask=m, other=0.0)
            tl.store(OUT + out_rows64[:, None] * D + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=m)
        else:
            tl.store(slab, tl.zeros((BLOCK_O, BLOCK_D), tl.float32), mask=m)
    tl.debug_barrier()


@triton.jit
def _owner_accumulator(OUT, SLAB, out_rows64, omask, pid, D, IN_PLACE: tl.constexpr, USED: tl.constexpr,
                       BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr):
    """Where an owner block's fp32 sums live: the output rows themselves (fp32 output, zeroed by the host), or this
    program's slab of the scratch (16-bit output), zeroed here and rounded into OUT when the block is done."""
    if IN_PLACE:
        base = OUT
        rows = out_rows64
    else:
        base = SLAB
        rows = (pid * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
        if USED:
            _slab_fill(SLAB, OUT, rows, out_rows64, omask, D, BLOCK_O, BLOCK_D, False)
    return base, rows


@triton.jit
def _fwd_kernel(H, W, B, TGT, LOGP, LSE, ENT,
                N, V, D, stride_hn, stride_wv, inv_t,
                HAS_BIAS: tl.constexpr, RETURN_ENT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows64, nmask = _span(pid * BLOCK_N, N, BLOCK_N)
    tgt = tl.load(TGT + rows64, mask=nmask, other=0).to(tl.int64)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols64, vmask = _span(v0, V, BLOCK_V)
        acc = _logits_tile(H, W, B, rows64, cols64, nmask, vmask, D, stride_hn, stride_wv,
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
def _owned_block(pid, i, nprog, n, BLOCK: tl.constexpr):
    """The i-th owner block of program pid in the persistent grid (blocks pid, pid + nprog, ...): its index, int64
    offsets and mask, and whether it exists."""
    blk = pid + i * nprog
    offs64, mask = _span(blk * BLOCK, n, BLOCK)
    return blk, offs64, mask, blk < tl.cdiv(n, BLOCK)


@triton.jit
def _dh_kernel(H, W, B, ROWS, TGT, LSE, ENT, GL, GH, DH, SLAB, SKIPS,
               M, V, D, stride_hn, stride_wv, inv_t, tile_eps, blocks_per_prog, nprog,
               HAS_BIAS: tl.constexpr, HAS_GH: tl.constexpr, FILTER: tl.constexpr, IEEE: tl.constexpr,
               UPCAST: tl.constexpr, IN_PLACE: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """dH[rows] = sum over vocabulary tiles of g @ W[tile]; program pid owns row blocks pid, pid + nprog, ..."""
    pid = tl.program_id(0)
    for i in range(0, blocks_per_prog):
        blk, idx64, nmask, live = _owned_block(pid, i, nprog, M, BLOCK_N)
        if live:
            rows64, tgt, lse, gl, ent, gh = _row_stats(idx64, nmask, ROWS, TGT, LSE, ENT, GL, GH, HAS_GH)
            acc_base, acc_rows = _owner_accumulator(DH, SLAB, rows64, nmask, pid, D, IN_PLACE, True, BLOCK_N, BLOCK_D)
            skipped = 0
            for v0 in range(0, V, BLOCK_V):
                cols64, vmask = _span(v0, V, BLOCK_V)
                z = _logits_tile(H, W, B, rows64, cols64, nmask, vmask, D, stride_hn, stride_wv,
                                 HAS_BIAS, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
                g, keep = _grad_tile(z, tgt, lse, gl, ent, gh, cols64, nmask, vmask, inv_t, tile_eps, HAS_GH,
                                     FILTER)
                if keep:
                    _add_product(acc_base, acc_rows, nmask, _operand(g, W, UPCAST), W, cols64, vmask, stride_wv, D,
                                 IEEE, UPCAST, BLOCK_D)
                else:
                    skipped += 1
            if not IN_PLACE:
                _slab_fill(SLAB, DH, acc_rows, rows64, nmask, D, BLOCK_N, BLOCK_D, True)
            if FILTER:
                tl.store(SKIPS + blk, skipped)


@triton.jit
def _dw_kernel(H, W, B, ROWS, TGT, LSE, ENT, GL, GH, DW, DB, SLAB, SKIPS,
               M, V, D, stride_hn, stride_wv, inv_t, tile_eps, blocks_per_prog, nprog,
               HAS_BIAS: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, HAS_GH: tl.constexpr,
               FILTER: tl.constexpr,
               IEEE: tl.constexpr, UPCAST: tl.constexpr, IN_PLACE: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """dW[vocab] = sum over compacted row tiles of g^T @ H[tile] (db = sum of g); program pid owns vocab blocks
    pid, pid + nprog, ..."""
    pid = tl.program_id(0)
    for i in range(0, blocks_per_prog):
        blk, cols64, vmask, live = _owned_block(pid, i, nprog, V, BLOCK_V)
        if live:
            acc_base, acc_rows = _owner_accumulator(DW, SLAB, cols64, vmask, pid, D, IN_PLACE, NEED_DW, BLOCK_V,
                                                    BLOCK_D)
            db = tl.zeros((BLOCK_V,), tl.float32)
            skipped = 0
            for n0 in range(0, M, BLOCK_N):
                idx64, nmask = _span(n0, M, BLOCK_N)
                rows64, tgt, lse, gl, ent, gh = _row_stats(idx64, nmask, ROWS, TGT, LSE, ENT, GL, GH, HAS_GH)
                z = _logits_tile(H, W, B, rows64, cols64, nmask, vmask, D, stride_hn, stride_wv,
                                 HAS_BIAS, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
                g, keep = _grad_tile(z, tgt, lse, gl, ent, gh, cols64, nmask, vmask, inv_t, tile_eps, HAS_GH,
                                     FILTER)
                if keep:
                    if NEED_DB:
                        db += tl.sum(g, 0)
                    if NEED_DW:
                        _add_product(acc_base, acc_rows, vmask, _operand(tl.trans(g), H, UPCAST), H, rows64, nmask,
                                     stride_hn, D, IEEE, UPCAST, BLOCK_D)
                else:
                    skipped += 1
            if NEED_DW and not IN_PLACE:
                _slab_fill(SLAB, DW, acc_rows, cols64, vmask, D, BLOCK_V, BLOCK_D, True)
            if NEED_DB:
                tl.store(DB + cols64, db, mask=vmask)
            if FILTER:
                tl.store(SKIPS + blk, skipped)


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
                      N, V, D, h.stride(0), w.stride(0), 1.0 / o.temperature,
                      HAS_BIAS=b is not None, RETURN_ENT=o.return_entropy, IEEE=h.dtype == torch.float32,
                      UPCAST=_interp_upcast(h), BLOCK_N=o.block_n, BLOCK_V=o.block_v, BLOCK_D=o.block_d)
    return logp, lse, (ent if o.return_entropy else None)


def _interp_upcast(h) -> bool:
    # the Triton interpreter (CPU tests) computes wrong bf16/fp16 tl.dot products: upcast there, never on a GPU
    return h.device.type != "cuda" and h.dtype != torch.float32


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _grid(num_blocks: int, block: int, D: int, in_place: bool) -> tuple[int, int]:
    """(programs, owner blocks per program): one program per block when accumulating in place, else as many as
    SCRATCH_BYTES of fp32 slabs (block x D each) allow, each walking several blocks (persistent grid)."""
    if in_place:
        return num_blocks, 1
    nprog = max(1, min(num_blocks, SCRATCH_BYTES // (block * D * 4)))
    return nprog, triton_cdiv(num_blocks, nprog)


def _triton_backward(h, w, b, rows, tgt, lse, ent, gl, gh, o: FusedLinearOptions, need_dh, need_dw, need_db):
    N, D = h.shape
    V = w.shape[0]
    M = rows.numel()
    f32 = torch.float32
    # The gradients in the input dtype, accumulated in fp32: in place when that dtype is fp32, else in slabs. Under
    # the interpreter 16-bit outputs take the fp32 path too (its fp32 -> bf16 casts are unreliable) and are rounded
    # on the host; on a GPU the slab path writes the 16-bit gradients directly (no fp32 copy of dH or dW).
    out_dt = f32 if _interp_upcast(h) else h.dtype
    in_place = out_dt == f32 and ACCUMULATE_IN_OUTPUT
    dH = torch.zeros(N, D, dtype=out_dt, device=h.device) if need_dh else None  # uncompacted rows stay zero
    # every dW row belongs to a vocab block whose owner writes it, unless there is nothing to write (M = 0)
    dW = (torch.zeros if (in_place or M == 0) else torch.empty)(V, D, dtype=out_dt, device=h.device) \
        if need_dw else None
    db = torch.zeros(V, dtype=f32, device=h.device) if need_db else None
    last_skipped.clear()
    if M > 0:
        filt = not o.exact
        has_gh = gh is not None
        gl = gl.to(f32)
        gh, ent = (gh.to(f32), ent) if has_gh else (gl, lse)  # unread when HAS_GH is off
        # both passes own blocks of `own` (rows, resp. vocabulary entries) and loop over tiles of `loop` (vocabulary
        # entries, resp. rows): same slab size and as many programs in the dW pass as in the dH pass
        own, loop = o.block_n, o.block_v
        nb_n, nb_v = triton_cdiv(M, own), triton_cdiv(V, own)
        grid_dh = _grid(nb_n, own, D, in_place)
        grid_dw = _grid(nb_v, own, D, in_place)
        scratch = None if in_place else torch.empty(
            max(grid_dh[0] if need_dh else 0, grid_dw[0] if need_dw else 0, 1) * own * D, dtype=f32, device=h.device)
        bias = b if b is not None else h
        common = dict(HAS_BIAS=b is not None, HAS_GH=has_gh, FILTER=filt, IEEE=h.dtype == f32,
                      UPCAST=_interp_upcast(h), IN_PLACE=in_place, BLOCK_D=o.block_d)
        scalars = (M, V, D, h.stride(0), w.stride(0), 1.0 / o.temperature)
        # exact=False: a row's softmax mass in a skipped tile is < filter_eps / (its number of vocabulary tiles)
        eps = o.eps_for(h.dtype)
        if need_dh:
            skips = torch.zeros(nb_n if filt else 1, dtype=torch.int32, device=h.device)
            _dh_kernel[(grid_dh[0],)](h, w, bias, rows, tgt, lse, ent, gl, gh, dH,
                                      dH if in_place else scratch, skips, *scalars, eps / triton_cdiv(V, loop),
                                      grid_dh[1], grid_dh[0],
                                      BLOCK_N=own, BLOCK_V=loop, **common)
            if filt:
                last_skipped["dh"] = skips
        if need_dw or need_db:
            skips = torch.zeros(nb_v if filt else 1, dtype=torch.int32, device=h.device)
            dw_out = dW if need_dw else lse  # bias only: the dW pass still runs (it owns db) but writes no dW
            _dw_kernel[(grid_dw[0],)](h, w, bias, rows, tgt, lse, ent, gl, gh, dw_out, db if need_db else lse,
                                      dw_out if (in_place or not need_dw) else scratch, skips,
                                      *scalars, eps / nb_v, grid_dw[1], grid_dw[0], NEED_DW=need_dw, NEED_DB=need_db,
                                      BLOCK_N=loop, BLOCK_V=own, **common)
            if filt:
                last_skipped["dw"] = skips
    return (dH.to(h.dtype) if need_dh else None), (dW.to(w.dtype) if need_dw else None), db
