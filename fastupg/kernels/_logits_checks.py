"""Argument and data checks of the logits ops (token_logprobs, fused_policy_loss), in one place.

* argument checks (host only: no launch, no sync): tensor types and shapes, the estimator, the A = 1 rule of 'one'
  branches, 0/1 masks, per-token arguments and their flat views for the kernels;
* in-place guards: logits overwritten with their gradient are refused (inplace_backward=True);
* data checks: the kernels write one int32 error word (the E_* bits below); it is read back once ("sync"), later
  ("deferred": raise_deferred_checks) or never ("off").
Shared by the Triton path (_logits_triton.py), the PyTorch reference (torch_reference.py) and the public API
(logits.py). Imports none of them (no cycles).
"""
from __future__ import annotations

import torch

from fastupg.kernels.estimator import AGGS, PRESETS, Estimator, check_per_token_arg, raise_failed_checks

# bits of the error word the kernels write (prep kernel: 0-5, main kernel per-token flags: 8-12; bits 0-2 of the
# per-token flags are the clip flags); the Triton kernels use them as tl.constexpr, _describer turns them into messages
E_MASK, E_W_NONFINITE, E_W_NEG, E_NO_ONLINE, E_NO_OFFLINE, E_NO_OLD = 1, 2, 4, 8, 16, 32
E_LOGITS, E_ADV, E_OLD, E_REF, E_TARGET = 256, 512, 1024, 2048, 4096


# ------------------------------------------------------------------------------------------------------------------
# argument checks (O(N); never an extra pass over N x V)
# ------------------------------------------------------------------------------------------------------------------
def _flatten(logits: torch.Tensor, targets: torch.Tensor, temperature: float, checks: list | None = None):
    """Argument checks and (N, V) / (N,) views. The targets-range check is a data check: appended to `checks` when
    given (run later with the other checks in one host sync; the kernels clamp the index meanwhile), else run now."""
    _check_logits_targets(logits, targets, temperature)
    V = logits.shape[-1]
    if targets.numel():
        now = checks is None
        checks = [] if now else checks
        checks.append((((targets < 0) | (targets >= V)).any(), lambda: (
            f"targets must lie in [0, {V}) (vocabulary size); got values in [{int(targets.min())}, "
            f"{int(targets.max())}] -- replace ignored positions by 0 and mask them")))
        if now:
            raise_failed_checks(checks)
    z = logits.reshape(-1, V)
    if z.stride(-1) != 1:
        z = z.contiguous()
    return z, targets.reshape(-1).to(torch.int64).contiguous()


def _nonfinite_check(lse: torch.Tensor, tgt: torch.Tensor, rows: torch.Tensor | None = None):
    """(bad, message) for raise_failed_checks: a non-finite row of logits (or a -inf target logit)."""
    bad = ~(torch.isfinite(lse) & torch.isfinite(tgt))
    if rows is not None:
        bad = bad & rows
    return bad.any(), lambda: (f"logits contain non-finite values (nan/inf) in row {int(bad.nonzero()[0])} "
                               "(or the target logit is -inf)")


# ------------------------------------------------------------------------------------------------------------------
# in-place writes: visible to autograd (version counter, mark_dirty) and to fastupg's own ops
# ------------------------------------------------------------------------------------------------------------------
_OVERWRITTEN = ("logits were overwritten with their gradient by an earlier {op}(..., inplace_backward=True) call: "
                "compute everything that reads these logits before that call, or pass inplace_backward=False")
_SECOND_BACKWARD = ("token_logprobs(..., inplace_backward=True): a second backward through the same graph, but the "
                    "first one overwrote the logits with their gradient (modified by an inplace operation); pass "
                    "inplace_backward=False to backward twice")
_USED_AFTER = ("the logits were used after fused_policy_loss(..., inplace_backward=True) overwrote them with their "
               "gradient: compute everything that reads the logits before that call, or pass inplace_backward=False")


def _mark_overwritten(t: torch.Tensor, op: str) -> None:
    """Remember on the tensor (and its base, for a view) that its values are now a gradient: our ops refuse it."""
    for u in (t, t._base):
        if u is not None:
            u._fastupg_overwritten = (op, u._version)


def _refuse_overwritten(t) -> None:
    for u in (t, getattr(t, "_base", None)):
        mark = getattr(u, "_fastupg_overwritten", None) if u is not None else None
        if mark is not None and mark[1] == u._version:  # (a later in-place refill by the user clears it)
            raise ValueError(_OVERWRITTEN.format(op=mark[0]))


def _refuse_leaf(logits: torch.Tensor, inplace: bool) -> None:
    if inplace and logits.requires_grad and (logits.is_leaf or (logits._base is not None and logits._base.is_leaf)):
        raise ValueError("inplace_backward=True would overwrite a leaf tensor that requires grad (or a view of one): "
                         "its .grad would share its memory. Pass logits computed by the model (e.g. lm_head's "
                         "output), or inplace_backward=False")
    if inplace and logits.retains_grad:
        raise ValueError("inplace_backward=True with logits.retain_grad(): the retained .grad would be the overwritten "
                         "logits buffer; drop retain_grad() or pass inplace_backward=False")


def _refuse_view(logits: torch.Tensor, inplace: bool) -> None:
    """The fused loss returns the overwritten logits to autograd beside the loss (mark_dirty); autograd cannot do that
    for a view of another tensor, such as a slice of model(...).logits, and would fail with an internal error."""
    if inplace and logits.requires_grad and logits._base is not None:
        raise ValueError("inplace_backward=True needs logits that are not a view of another tensor (a slice such as "
                         "model(...).logits[:, p - 1:-1] is one): compute the completion positions' logits directly, "
                         "e.g. model.lm_head(hidden[:, p - 1:-1]), or pass inplace_backward=False")


# ------------------------------------------------------------------------------------------------------------------
# data checks: computed by the kernels into one int32 word, read back once ("sync"), later ("deferred") or never
# ------------------------------------------------------------------------------------------------------------------
CHECK_MODES = ("sync", "deferred", "off")
_DEFERRED: list = []  # (cuda event or None, int32 tensor holding the error word, describe(code) -> message)


def raise_deferred_checks(wait: bool = True) -> None:
    """Raise (ValueError) the first failed data check of earlier `check="deferred"` calls.

    fused_policy_loss(check="deferred") queues its checks without a host sync; they are read the next time any
    fastupg logits op is called (those already finished: no wait) or when this function is called (wait=True waits
    for them). Call it where you synchronize anyway (e.g. when logging metrics) to see errors promptly.
    """
    pending, first = list(_DEFERRED), None
    _DEFERRED.clear()
    for ev, word, describe in pending:
        if ev is not None and not wait and not ev.query():
            _DEFERRED.append((ev, word, describe))
            continue
        if ev is not None:
            ev.synchronize()
        code = int(word[0])
        if code and first is None:
            first = describe(code)
    if first is not None:
        raise ValueError(first + " (raised by a check='deferred' data check of an earlier call)")


def _submit_checks(err: torch.Tensor, mode: str, describe) -> None:
    if mode == "off":
        return
    if mode == "sync":
        code = int(err[0])  # the one host sync of the call, after every launch was queued
        if code:
            raise ValueError(describe(code))
        return
    if err.is_cuda:
        host = torch.empty(1, dtype=torch.int32, pin_memory=True)
        host.copy_(err, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        _DEFERRED.append((ev, host, describe))
    else:
        _DEFERRED.append((None, err, describe))


def _describer(est: Estimator, V: int, targets: torch.Tensor):
    name = est.name
    ref = est.online.ref if est.online is not None else None

    def describe(code: int) -> str:
        if code & E_TARGET:
            return (f"targets must lie in [0, {V}) (vocabulary size); got values in [{int(targets.min())}, "
                    f"{int(targets.max())}] -- replace ignored positions by 0 and mask them")
        msgs = [
            (E_MASK, "mask must hold 0/1 (or bool) values: pass per-token weights as weight="),
            (E_ADV, "advantages contains non-finite values (nan/inf) on tokens whose branch uses them"),
            (E_OLD, "old_logp contains non-finite values (nan/inf)"),
            (E_W_NONFINITE, "weight contains non-finite values (nan/inf)"),
            (E_W_NEG, "weight must be >= 0 everywhere"),
            (E_REF, "ref_logp contains non-finite values (nan/inf)"),
            (E_NO_ONLINE, f"offline= marks online tokens but estimator {name!r} has no online branch"),
            (E_NO_OFFLINE, f"offline= marks offline tokens but estimator {name!r} has no offline branch"),
            (E_NO_OLD, f"old_logp= is required: estimator {name!r} uses ref={ref!r} on on-policy tokens (pass "
                       "logp.detach() for a single update)"),
            (E_LOGITS, "logits contain non-finite values (nan/inf) in a row that counts (mask != 0), or the target "
                       "logit is -inf"),
        ]
        for bit, msg in msgs:
            if code & bit:
                return msg
        return f"data check failed (code {code})"
    return describe


# ------------------------------------------------------------------------------------------------------------------
# argument checks (host only: no launch, no sync)
# ------------------------------------------------------------------------------------------------------------------
def resolve_estimator(estimator) -> Estimator:
    """An Estimator, or the preset of that name (`"grpo"` -> Estimator.preset("grpo"))."""
    if isinstance(estimator, str):
        return Estimator.preset(estimator)
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be a fastupg.Estimator or a preset name ({sorted(PRESETS)}), "
                        f"got {type(estimator).__name__}")
    return estimator


def advantage_rule(est: Estimator) -> tuple[bool, bool, bool]:
    """(online tokens use A = 1, offline tokens use A = 1, advantages= required): a branch whose advantage
    component is 'one' uses A = 1 whatever advantages= holds; advantages= is needed only by the other branches."""
    on1 = est.online is None or est.online.advantage == "one"
    off1 = est.offline is None or est.offline.advantage == "one"
    return on1, off1, not (on1 and off1)


def effective_advantages(est: Estimator, advantages, shape, offline, device):
    """advantages with the A = 1 rule applied (PyTorch; the kernels apply it in registers)."""
    on1, off1, needed = advantage_rule(est)
    if advantages is None:
        if needed:
            side, b = ("online", est.online) if not on1 else ("offline", est.offline)
            raise ValueError(f"advantages= is required: estimator {est.name!r} uses advantage={b.advantage!r} on "
                             f"its {side} branch")
        return torch.ones(shape, device=device)
    if isinstance(advantages, (int, float)) and not isinstance(advantages, bool):
        advantages = torch.full(shape, float(advantages), device=device)
    if not (on1 or off1) or not isinstance(advantages, torch.Tensor) or advantages.shape != shape \
            or not advantages.is_floating_point():
        return advantages  # (a malformed argument: policy_loss raises the error naming it)
    if offline is None:
        off = torch.full(shape, est.online is None, device=advantages.device)
    else:
        off = offline.to(advantages.device).bool()
    ones = off if not on1 else (~off if not off1 else torch.ones_like(off))
    return torch.where(ones, torch.ones_like(advantages), advantages)


def check_mask_values(mask) -> None:
    """mask holds 0/1 (or bool): a fractional mask is refused, not rounded (per-token weights go in weight=)."""
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must hold 0/1 (or bool) values: pass per-token weights as weight=")


def _check_logits_targets(logits, targets, temperature):
    if not isinstance(logits, torch.Tensor) or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16,
                                                                    torch.float64):
        raise TypeError(f"logits must be a float32/bfloat16/float16 tensor, got {getattr(logits, 'dtype', logits)}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (N, V) or (B, T, V), got shape {tuple(logits.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32, torch.int16,
                                                                      torch.uint8, torch.int8):
        raise TypeError(f"targets must be an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected {tuple(logits.shape[:-1])} "
                         "(logits without the vocabulary dim)")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def _flat_arg(name, t, shape, device, kind=None):
    """Shape/dtype check of a per-token argument and its flat (N,) view for the kernels (no copy when contiguous)."""
    if t is None:
        return None
    check_per_token_arg(name, t, shape, kind, shape_of="targets")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the logits on {device}")
    t = t.reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t if t.is_contiguous() else t.contiguous()


# ------------------------------------------------------------------------------------------------------------------
# the fused loss's arguments: checked on the host, flat (N,) views for the kernels
# ------------------------------------------------------------------------------------------------------------------
def _prepare_args(est: Estimator, logits, targets, kw, agg) -> dict:
    """Host-side argument checks of fastupg.estimator.prepare_inputs (shapes, dtypes, what the estimator needs) and
    flat views for the kernels; the value checks run in the kernels."""
    shape, dev = targets.shape, logits.device
    mode = agg or est.agg
    if mode not in AGGS:
        raise ValueError(f"policy_loss.agg={mode!r} is not one of {list(AGGS)}")
    modes = [mode] if est.offline_agg is None else [mode, est.offline_agg]
    norm_modes = [m for m in modes if m.endswith("token-sum-norm")]
    if norm_modes and est.agg_norm is None and targets.dim() != 2:
        raise ValueError(f"agg={norm_modes[0]!r} needs Estimator.agg_norm (or 2-D log-probs, whose "
                         "padded length is the default constant)")
    if any(m.startswith("seq-mean") for m in modes) and kw["seq_ids"] is None \
            and targets.dim() != 2:
        raise ValueError(f"agg={modes} needs seq_ids= (or 2-D log-probs, one row per sequence)")
    _, _, needed = advantage_rule(est)
    adv = kw["advantages"]
    if adv is None and needed:
        effective_advantages(est, None, shape, None, dev)  # raises the error naming what needs it
    if isinstance(adv, (int, float)) and not isinstance(adv, bool):
        adv = float(adv)
        if adv != adv or abs(adv) == float("inf"):
            raise ValueError("advantages contains non-finite values (nan/inf)")
    else:
        adv = _flat_arg("advantages", adv, shape, dev, "float")
    if est.kl_coef != 0 and kw["ref_logp"] is None:
        raise ValueError("ref_logp= is required when Estimator.kl_coef != 0")
    a = dict(adv=adv, targets=_flat_arg("targets", targets, shape, dev),
             old=_flat_arg("old_logp", kw["old_logp"], shape, dev, "float"),
             weight=_flat_arg("weight", kw["weight"], shape, dev, "float"),
             ref=_flat_arg("ref_logp", kw["ref_logp"], shape, dev, "float"),
             mask=_flat_arg("mask", kw["mask"], shape, dev),
             offline=_flat_arg("offline", kw["offline"], shape, dev),
             seq_ids=_flat_arg("seq_ids", kw["seq_ids"], shape, dev, "int"))
    if a["mask"] is not None and a["mask"].dtype == torch.float64:
        a["mask"] = a["mask"].float()  # (0/1 checked in the kernel)
    return a
