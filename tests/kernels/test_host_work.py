"""Host work of the chunked fused-linear impl: what it costs per chunk, counted through the dispatcher (CPU).

On a GPU every torch op is a launch and every read of a tensor's value on the host (`.item()`, `bool(t)`,
`.tolist()`, `nonzero`) a sync that leaves the GPU idle while the host catches up. The chunked impl sweeps the rows
chunk by chunk, so whatever it does per chunk is paid N / chunk times: this file pins it to the work itself (the
logits GEMM, the Triton kernel launches, the gradient GEMMs per group) and keeps the host syncs of a call
independent of the number of chunks. Counted here by running each path at two sizes and comparing.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/kernels/conftest.py does it too)

from collections import Counter  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from fastupg.estimator import Estimator  # noqa: E402
from fastupg.kernels.fused_linear import fused_linear_logprobs, fused_linear_policy_loss  # noqa: E402

V, D, TEMP = 1031, 40, 0.7
ROWS = 8  # fp32 logits rows per chunk of the no-grad forward (chunk_bytes = 4 * V * ROWS)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "item"}  # what .item() / bool() / int() / nonzero dispatch to
# ops that move no data: views, metadata, allocations without a fill
FREE_OPS = {"view", "slice", "t", "empty", "unsqueeze", "squeeze", "unbind", "as_strided", "expand", "alias",
            "detach", "select", "reshape", "_unsafe_view", "transpose", "permute", "empty_like", "lift_fresh"}


class _HostWork(TorchDispatchMode):
    """Counts torch ops, host syncs and Triton launches (ops inside a launch are the interpreter's, not counted)."""

    def __init__(self):
        super().__init__()
        self.ops, self.launches, self.tolist = Counter(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self):
        return sum(v for k, v in self.ops.items() if k in SYNC_OPS) + self.tolist

    @property
    def work(self):
        return Counter({k: v for k, v in self.ops.items() if k not in FREE_OPS})


@pytest.fixture
def count(monkeypatch):
    """count(fn, *args) -> _HostWork of one call."""
    state = {"mode": None}
    run, tolist = interpreter.InterpretedFunction.run, torch.Tensor.tolist

    def counted_run(self, *a, **k):
        mode = state["mode"]
        if mode is None:
            return run(self, *a, **k)
        mode.launches += 1
        with _disable_current_modes():
            return run(self, *a, **k)

    def counted_tolist(self):
        if state["mode"] is not None:
            state["mode"].tolist += 1
        return tolist(self)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted_run)
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def _count(fn, *args):
        mode = _HostWork()
        state["mode"] = mode
        try:
            with mode:
                fn(*args)
        finally:
            state["mode"] = None
        return mode

    return _count


def _inputs(N, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.3
    tgt = torch.randint(0, V, (N,), generator=g)
    return h, w, tgt, torch.randn(N, generator=g)


def _nograd_forward(N):
    h, w, tgt, _ = _inputs(N)

    def fn():
        with torch.no_grad():
            fused_linear_logprobs(h, w, tgt, TEMP, return_entropy=True, impl="chunked", chunk_bytes=4 * V * ROWS)
    return fn


def _policy_loss_step(N, one_pass):
    # GRPO with old = current log-probs: no token clipped, so every row has a gradient (dense)
    h, w, tgt, adv = _inputs(N)
    with torch.no_grad():
        old = fused_linear_logprobs(h, w, tgt, TEMP, impl="torch")
    # one-pass: (4 + 4 * 3) bytes per row of a chunk -> ROWS fp32 rows and groups of 3 * ROWS gradient rows
    chunk = (4 + 4 * 3) * V * ROWS

    def fn():
        hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, _ = fused_linear_policy_loss(hx, wx, tgt, Estimator.preset("grpo"), advantages=adv, old_logp=old,
                                           temperature=TEMP, impl="chunked", chunk_bytes=chunk, one_pass=one_pass)
        loss.backward()
    return fn


def _per_extra_chunk(count, make, small, large):
    a, b = count(make(small)), count(make(large))
    extra_chunks = (large - small) // ROWS
    work = b.work
    work.subtract(a.work)
    per_chunk = {k: v / extra_chunks for k, v in work.items() if v}
    launches = (b.launches - a.launches) / extra_chunks
    # the figures benchmarks/RESULTS.md quotes ("Host work per chunk"): `pytest -s` shows them
    print(f"\nper extra chunk: ops {per_chunk}, launches {launches}; host syncs per call: {a.syncs} ({small} rows), "
          f"{b.syncs} ({large} rows)")
    return a, b, per_chunk, launches


def test_nograd_forward_per_chunk_is_one_gemm_and_one_launch(count):
    """The old/ref log-prob pass: per chunk the logits GEMM and the log-prob kernel, no sync (was one per chunk)."""
    a, b, per_chunk, launches = _per_extra_chunk(count, _nograd_forward, 4 * ROWS, 12 * ROWS)
    assert per_chunk == {"mm": 1.0}, per_chunk
    assert launches == 1.0
    assert b.syncs == a.syncs, (a.syncs, b.syncs)


@pytest.mark.parametrize("one_pass,one_launch", [(None, False), (None, True), (False, False)])
def test_policy_loss_per_chunk_is_gemms_and_launches(count, one_pass, one_launch, monkeypatch):
    """Training step (forward + backward): per fp32 chunk the logits GEMM (twice on the two-pass path, which
    recomputes them in backward) and the kernel launches; per group of chunks the two gradient GEMMs. The host
    syncs of a step do not grow with its length. one_launch: the fused loss kernel's one-launch form (its counters
    zeroed once per call, not per chunk)."""
    from fastupg.kernels import _logits_triton as KT
    monkeypatch.setitem(KT.SPLIT, "one_launch", one_launch)
    a, b, per_chunk, launches = _per_extra_chunk(count, lambda n: _policy_loss_step(n, one_pass), 6 * ROWS,
                                                 18 * ROWS)
    # 12 more chunks of ROWS rows = 4 more groups of 3 chunks; per group: dH = g @ W (mm) and dW += g^T H (addmm_).
    # The two-pass forward holds only fp32 logits: its chunks are 4x longer (1/4 of a logits GEMM per ROWS rows).
    gemms = {"mm": 1 + 1 / 3, "addmm_": 1 / 3} if one_pass is None else {"mm": 1 / 4 + 1 + 1 / 3, "addmm_": 1 / 3}
    # the interpreter cannot write 16-bit values, so the kernel writes fp32 and torch copies; fp32 inputs here:
    # no copy at all
    assert per_chunk.keys() == gemms.keys(), per_chunk
    for k, v in gemms.items():
        assert per_chunk[k] == pytest.approx(v), (k, per_chunk)
    # one-pass: the fused loss kernel's three launches (stats, row, gradient), or one; two-pass: the log-prob kernel
    # per (4x longer) forward chunk and its gradient kernel per backward chunk
    assert launches == ((1.0 if one_launch else 3.0) if one_pass is None else 1 / 4 + 1)
    assert b.syncs == a.syncs, (a.syncs, b.syncs)
