"""The Unified Policy Gradient Estimator (docs/math.md §1) on N-sized tensors.

    grad_uni = 1_stable * (1 / pi_ref) * A_hat * grad pi_theta

An `Estimator` is a frozen pair of `Branch`es -- one for on-policy (rollout) tokens and one for
off-policy (demonstration) tokens, picked per token by an `offline` flag -- plus the clip bounds,
shaping, extra terms and aggregation. `policy_loss` turns per-token log-probs from any source into
the scalar loss whose autograd gradient is the estimator. It is also the float64 oracle the fused
kernels in `fastupg.kernels` are tested against.

The loss is always   L = sum_t s_t * c_t * w_t * ell_t,   where
    ell_t = pg_t - entropy_coef * H_t + kl_coef * KL_t     (per-token loss, docs/math.md §1.2-1.3)
    s_t   = aggregation weight (token-mean, seq-mean-..., computed by `aggregation_weights`)
    c_t   = coefficient of the token's branch,  w_t = caller's per-token weight (HPT alpha/beta)
so every implementation only has to agree on ell_t and its derivative d ell_t / d l_t.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

REFS = ("policy", "old", "one", "seq")
MASKS = ("none", "clip", "cispo")
ADVANTAGES = ("one", "grpo", "mixed", "reinforce", "rloo", "gae")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum",
        "token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _choice(owner: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name}={value!r} is not one of {list(allowed)}")


_NUMBER_FIELDS = ("eps_low", "eps_high", "dual_clip", "gamma", "entropy_coef", "kl_coef", "agg_norm")
_STR_FIELDS = ("kl_estimator", "agg", "offline_agg", "name")


def _check_field_type(key: str, value) -> None:
    """A wrong type (e.g. eps_high="0.2" from a YAML string) is a TypeError naming the field, never a comparison
    error deep inside __post_init__ or, worse, a silently different estimator."""
    none_ok = key in ("dual_clip", "agg_norm", "offline_agg", "online", "offline")
    if value is None and none_ok:
        return
    if key in _NUMBER_FIELDS:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        want = "a number"
    elif key in _STR_FIELDS:
        ok, want = isinstance(value, str), "a str"
    elif key == "adv_std":
        ok, want = isinstance(value, bool), "a bool"
    elif key in ("online", "offline"):
        ok, want = isinstance(value, Branch), "a Branch"
    else:
        return
    if not ok:
        raise TypeError(f"Estimator.{key} must be {want}{' or None' if none_ok else ''}, "
                        f"got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class Branch:
    """Component choices for one kind of token (on-policy rollout or off-policy demonstration).

    ref:       reference-policy denominator: 'policy' (pi_theta: SFT/REINFORCE), 'old' (pi_old: PPO/GRPO),
               'one' (pi_ref = 1: offline SRFT/LUFFY), 'seq' (GSPO's sequence-level ratio)
    mask:      stabilization mask: 'none', 'clip' (PPO-style, optionally dual-clipped), 'cispo'
    advantage: how the trainer estimates A for these tokens (policy_loss takes A as given)
    coef:      multiplies this branch's per-token loss (e.g. HPT's SFT coefficient)
    """
    ref: str
    mask: str = "none"
    advantage: str = "one"
    coef: float = 1.0

    def __post_init__(self):
        _choice("Branch", "ref", self.ref, REFS)
        _choice("Branch", "mask", self.mask, MASKS)
        _choice("Branch", "advantage", self.advantage, ADVANTAGES)
        if self.ref == "policy" and self.mask != "none":
            raise ValueError(f"Branch.mask={self.mask!r} needs a ratio: with ref='policy' the only mask is 'none'")
        if self.mask == "cispo" and self.ref != "old":
            raise ValueError(f"Branch.mask='cispo' needs ref='old' (got ref={self.ref!r})")
        if self.ref == "one" and self.mask != "none":
            raise ValueError(f"Branch.mask={self.mask!r} with ref='one' is not a defined estimator: use mask='none'")
        if not isinstance(self.coef, (int, float)) or isinstance(self.coef, bool):
            raise TypeError(f"Branch.coef must be a number, got {self.coef!r} ({type(self.coef).__name__})")
        if not math.isfinite(self.coef) or self.coef < 0:
            raise ValueError(f"Branch.coef must be finite and >= 0, got {self.coef}")

    @property
    def needs_old(self) -> bool:
        return self.ref in ("old", "seq")

    @property
    def needs_advantages(self) -> bool:
        """False for advantage 'one': the branch's tokens use A = 1 whatever `advantages=` holds."""
        return self.advantage != "one"


@dataclass(frozen=True)
class Estimator:
    """A complete estimator: two branches plus the knobs they share. Build one with `Estimator.preset`."""
    online: Branch | None
    offline: Branch | None = None
    eps_low: float = 0.2            # clip range below 1 (ratio >= 1 - eps_low)
    eps_high: float = 0.2           # clip range above 1 (ratio <= 1 + eps_high)
    dual_clip: float | None = None  # c > 1: for A < 0 the loss is capped at -c * A
    gamma: float = 0.0              # LUFFY policy shaping for ref='one': rho = p / (p + gamma)
    adv_std: bool = True            # grpo/mixed advantage divides by the group std (False: Dr.GRPO)
    entropy_coef: float = 0.0       # loss -= entropy_coef * H_t
    kl_coef: float = 0.0            # loss += kl_coef * KL_t(pi_theta || pi_ref)
    kl_estimator: str = "k3"
    agg: str = "token-mean"
    offline_agg: str | None = None  # None: both branches aggregated together; else each by its own mode, summed
    agg_norm: float | None = None   # constant C of (seq-mean-)token-sum-norm (None: padded length of a 2-D batch)
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_field_type(f.name, getattr(self, f.name))
        if self.online is None and self.offline is None:
            raise ValueError("Estimator needs at least one of online=, offline= branches")
        for side in ("online", "offline"):
            b = getattr(self, side)
            if b is not None and not isinstance(b, Branch):
                raise TypeError(f"Estimator.{side} must be a Branch or None, got {type(b).__name__}")
        if self.offline is not None:
            if self.offline.ref in ("old", "seq"):
                raise ValueError(f"Estimator.offline.ref={self.offline.ref!r}: demonstrations have no behaviour "
                                 "log-probs; use 'policy' (SFT) or 'one' (off-policy RL)")
            if self.offline.advantage == "gae":
                raise ValueError("Estimator.offline.advantage='gae' needs a value model over demonstrations; not supported")
        for name in ("eps_low", "eps_high"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"Estimator.{name} must be finite and >= 0, got {v}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"Estimator.dual_clip must be > 1 (or None), got {self.dual_clip}")
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"Estimator.gamma must be finite and >= 0, got {self.gamma}")
        for name in ("entropy_coef", "kl_coef"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"Estimator.{name} must be finite, got {getattr(self, name)}")
        _choice("Estimator", "kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("Estimator", "agg", self.agg, AGGS)
        if self.offline_agg is not None:
            _choice("Estimator", "offline_agg", self.offline_agg, AGGS)
        if self.agg_norm is not None and not self.agg_norm > 0:
            raise ValueError(f"Estimator.agg_norm must be > 0, got {self.agg_norm}")

    # -- presets ---------------------------------------------------------------------------------
    @staticmethod
    def preset(name: str, **overrides) -> "Estimator":
        """One of PRESETS (docs/math.md §1), with any field overridden: `Estimator.preset('grpo', eps_high=0.28)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
        base = PRESETS[name]
        fields = {f.name for f in dataclasses.fields(Estimator)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ValueError(f"unknown Estimator field(s) {bad}; allowed: {sorted(fields)}")
        for key, value in overrides.items():
            _check_field_type(key, value)
        return dataclasses.replace(base, **overrides)

    @property
    def sequence_level(self) -> bool:
        """True when some branch needs whole-sequence statistics (GSPO): the fused token kernels can't do it."""
        return self.online is not None and self.online.ref == "seq"

    def branch(self, offline: bool) -> Branch | None:
        return self.offline if offline else self.online

    @property
    def needs_advantages(self) -> bool:
        """True when some branch estimates A (anything but advantage 'one'): then `advantages=` is required."""
        return any(b is not None and b.needs_advantages for b in (self.online, self.offline))


_GRPO = Branch(ref="old", mask="clip", advantage="grpo")
_SFT = Branch(ref="policy", mask="none", advantage="one")

PRESETS: dict[str, Estimator] = {
    "sft": Estimator(online=None, offline=_SFT, name="sft"),
    "reinforce": Estimator(online=Branch("policy", "none", "reinforce"), name="reinforce"),
    "ppo": Estimator(online=Branch("old", "clip", "gae"), name="ppo"),
    "grpo": Estimator(online=_GRPO, name="grpo"),
    # Dr.GRPO as the fastupg preset has always computed it: sum over tokens / C (old verl; TRL's dr_grpo is
    # agg='seq-mean-token-sum-norm', i.e. also / number of sequences -- see fastupg.integrations.trl)
    "dr_grpo": Estimator(online=_GRPO, adv_std=False, agg="token-sum-norm", name="dr_grpo"),
    "dapo": Estimator(online=_GRPO, eps_high=0.28, agg="token-mean", name="dapo"),
    # CISPO (MiniMax-M1): only the upper bound is used, so eps_low = 1 puts the lower bound at 0 (never active);
    # eps_high = 0.28 as in the ScaleRL/DAPO settings. The clipped weight is stop-gradient: every token keeps a gradient.
    "cispo": Estimator(online=Branch("old", "cispo", "grpo"), eps_low=1.0, eps_high=0.28, name="cispo"),
    "gspo": Estimator(online=Branch("seq", "clip", "grpo"), eps_low=3e-4, eps_high=4e-4,
                      agg="seq-mean-token-mean", name="gspo"),
    "srft": Estimator(online=Branch("old", "clip", "mixed"), offline=Branch("one", "none", "mixed"), name="srft"),
    "luffy": Estimator(online=Branch("old", "clip", "mixed"), offline=Branch("one", "none", "mixed"),
                       gamma=0.1, name="luffy"),
    # HPT (paper): GRPO on prompts the model solves, SFT on the others; alpha/beta arrive as per-token weights.
    "hpt": Estimator(online=_GRPO, offline=_SFT, name="hpt"),
}


# -- aggregation ----------------------------------------------------------------------------------
def _dense_ids(seq_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    uniq, inv = torch.unique(seq_ids, return_inverse=True)
    return inv, uniq.numel()


def _agg_weights_one(mask: torch.Tensor, seq: torch.Tensor | None, nseq: int, mode: str,
                     norm: float | None) -> torch.Tensor:
    """Aggregation weight s_t of each token for one group of tokens (mask is float 0/1)."""
    if mode == "token-sum":
        return mask
    if mode == "token-mean":
        return mask / mask.sum().clamp_min(1.0)
    if mode == "token-sum-norm":
        # sum over all tokens / constant C: Dr.GRPO as verl < 0.5 computed 'seq-mean-token-sum-norm' (and so the
        # official HPT code, with C = 8192). fastupg's own name, since verl's mode now also averages over sequences
        return mask / norm
    assert seq is not None
    per_seq = torch.zeros(nseq, dtype=mask.dtype, device=mask.device).index_add_(0, seq, mask)
    n_nonempty = (per_seq > 0).sum().clamp_min(1).to(mask.dtype)
    if mode == "seq-mean-token-sum":
        return mask / n_nonempty
    if mode == "seq-mean-token-sum-norm":
        # verl's agg_loss: mean over non-empty sequences of the token sum, / C (= TRL's dr_grpo: sum / (B * C))
        return mask / (n_nonempty * norm)
    # seq-mean-token-mean
    return mask / (per_seq.clamp_min(1.0)[seq] * n_nonempty)


def aggregation_weights(estimator: Estimator, mask: torch.Tensor, offline: torch.Tensor,
                        seq_ids: torch.Tensor | None, agg: str | None = None,
                        padded_len: int | None = None, nseq: int | None = None) -> torch.Tensor:
    """s_t such that the aggregated loss is sum_t s_t * loss_t. O(N); shared by every implementation."""
    mode = agg or estimator.agg
    _choice("policy_loss", "agg", mode, AGGS)
    modes = [mode] if estimator.offline_agg is None else [mode, estimator.offline_agg]
    norm = estimator.agg_norm if estimator.agg_norm is not None else padded_len
    for m_ in modes:
        if m_.endswith("token-sum-norm") and norm is None:
            raise ValueError(f"agg={m_!r} needs Estimator.agg_norm (or 2-D log-probs, whose padded length is the "
                             "default constant)")
    if any(m.startswith("seq-mean") for m in modes) and seq_ids is None:
        raise ValueError(f"agg={modes} needs seq_ids= (or 2-D log-probs, one row per sequence)")
    seq = None
    if seq_ids is not None and any(m.startswith("seq-mean") for m in modes):
        # nseq given: ids are already 0..nseq-1 (the rows of 2-D inputs); else densify (torch.unique)
        seq, nseq = (seq_ids, nseq) if nseq is not None else _dense_ids(seq_ids)
    mask = mask.to(torch.float64)  # O(N): exact weights cost nothing next to the vocabulary pass
    if estimator.offline_agg is None:
        return _agg_weights_one(mask, seq, nseq, mode, norm)
    off = offline.to(mask.dtype)
    return (_agg_weights_one(mask * (1 - off), seq, nseq, mode, norm)
            + _agg_weights_one(mask * off, seq, nseq, estimator.offline_agg, norm))


# -- per-token loss -------------------------------------------------------------------------------
def _kl(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    d = ref_logp - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1.0  # k3 (Schulman): unbiased, always >= 0


def _branch_pg(est: Estimator, b: Branch, l, A, old, seq_ratio, metrics_out: dict):
    """Policy-gradient per-token loss of one branch (the table of docs/math.md §1.2), plus clip indicators."""
    zeros = torch.zeros_like(l, dtype=torch.bool)
    low = high = dual = zeros
    if b.ref == "policy":
        return -A * l, low, high, dual, None
    if b.ref == "one":
        p = torch.exp(l)
        rho = p if est.gamma == 0 else p / (p + est.gamma)
        return -A * rho, low, high, dual, None
    if b.ref == "old":
        r = torch.exp(l - old)
    else:  # seq: rho = sg(s_i) * exp(l - sg(l)) -- value s_i, gradient s_i * grad l
        r = seq_ratio.detach() * torch.exp(l - l.detach())
    lo, hi = 1.0 - est.eps_low, 1.0 + est.eps_high
    if b.mask == "none":
        return -A * r, low, high, dual, r
    if b.mask == "cispo":
        rc = r.detach().clamp(lo, hi)
        return -rc * A * l, r.detach() < lo, r.detach() > hi, dual, r
    loss = torch.maximum(-A * r, -A * r.clamp(lo, hi))
    low = (r.detach() < lo) & (A < 0)
    high = (r.detach() > hi) & (A > 0)
    if est.dual_clip is not None:
        cap = -est.dual_clip * A
        dual = (A < 0) & (loss.detach() > cap)
        loss = torch.where(A < 0, torch.minimum(loss, cap), loss)
    return loss, low, high, dual, r


def raise_failed_checks(checks: list) -> None:
    """Data-dependent checks, run with ONE host sync: `checks` holds (0-d bool tensor "bad", message or callable).

    Every `bool(tensor)` is a GPU->CPU sync that stalls the launch queue; a loss with ten of them spends more time
    idle than in its kernel. The checks are collected while the work is queued and read back together.
    """
    if not checks:
        return
    dev = checks[0][0].device  # (a check built from a CPU scalar argument joins the others' device)
    bad = torch.stack([b.reshape(()).to(dev, torch.bool) for b, _ in checks]).tolist()
    for flag, (_, msg) in zip(bad, checks):
        if flag:
            raise ValueError(msg() if callable(msg) else msg)


def check_per_token_arg(name: str, t, shape, dtype_kind: str | None = None, shape_of: str = "logp") -> None:
    """A per-token argument is a tensor of `shape` (that of `shape_of`), floating point for dtype_kind="float",
    integer for "int": the argument checks shared by policy_loss and the fused kernels (fastupg.kernels)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} (the shape of {shape_of})")
    if dtype_kind == "float" and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if dtype_kind == "int" and t.is_floating_point():
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def _check_tensor(name: str, t, n_shape, *, finite=True, dtype_kind=None, checks=None):
    if t is None:
        return None
    check_per_token_arg(name, t, n_shape, dtype_kind)
    if finite and t.is_floating_point():
        checks.append(((~torch.isfinite(t)).any(), f"{name} contains non-finite values (nan/inf)"))
    return t


def prepare_inputs(logp_shape, estimator: Estimator, *, advantages=None, old_logp=None, mask=None, offline=None,
                   seq_ids=None, weight=None, entropy=None, ref_logp=None, device=None,
                   entropy_in_kernel: bool = False, checks: list | None = None):
    """Validate and flatten the per-token inputs shared by `policy_loss` and the fused kernels.

    Returns a dict of flat (N,) tensors: adv, old (or None), mask (bool), offline (bool), seq (or None),
    weight (float: branch coef * caller weight), ref (or None), plus padded_len for 2-D inputs and nseq (the number
    of sequences when seq ids are known to be 0..nseq-1, else None).
    `adv` is the advantage every implementation must use: 1.0 on the tokens of a branch whose advantage is 'one'
    (SFT), whatever `advantages=` holds there; `advantages=` may be None when no branch needs it (then `adv` is all
    ones, float32 on `device`).
    Value checks (non-finite, negative weights, tokens of a missing branch) are appended to `checks` when it is
    given, for the caller to run with its own (see `raise_failed_checks`); else they run here, in one sync.
    """
    deferred = checks is not None
    checks = [] if checks is None else checks
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be a fastupg.Estimator, got {type(estimator).__name__}")
    shape = torch.Size(logp_shape)
    if len(shape) not in (1, 2):
        raise ValueError(f"logp must be 1-D (N,) or 2-D (B, T), got shape {tuple(shape)}")
    if advantages is None:
        if estimator.needs_advantages:
            need = [f"{side} (advantage={b.advantage!r})" for side, b in (("online", estimator.online),
                                                                          ("offline", estimator.offline))
                    if b is not None and b.needs_advantages]
            raise ValueError(f"advantages= is required: estimator {estimator.name!r} estimates A on its "
                             f"{' and '.join(need)} tokens")
        advantages = torch.ones(shape, device=device)  # every branch uses A = 1 (SFT)
    if isinstance(advantages, (int, float)) and not isinstance(advantages, bool):
        advantages = torch.full(shape, float(advantages), device=device)
    _check_tensor("advantages", advantages, shape, dtype_kind="float", checks=checks)
    _check_tensor("old_logp", old_logp, shape, dtype_kind="float", checks=checks)
    _check_tensor("weight", weight, shape, dtype_kind="float", checks=checks)
    _check_tensor("entropy", entropy, shape, dtype_kind="float", checks=checks)
    _check_tensor("ref_logp", ref_logp, shape, dtype_kind="float", checks=checks)
    _check_tensor("mask", mask, shape, checks=checks)
    _check_tensor("offline", offline, shape, checks=checks)
    _check_tensor("seq_ids", seq_ids, shape, checks=checks)
    if seq_ids is not None and seq_ids.is_floating_point():
        raise TypeError(f"seq_ids must be an integer tensor, got {seq_ids.dtype}")
    if weight is not None:
        checks.append(((weight < 0).any(), "weight must be >= 0 everywhere"))
    if mask is not None and mask.dtype != torch.bool:
        # a fractional mask would silently count as 1: per-token weights go through weight= (as in fused_policy_loss)
        checks.append((((mask != 0) & (mask != 1)).any(), "mask must hold 0/1 (or bool) values: pass per-token "
                       "weights as weight="))

    padded_len = shape[1] if len(shape) == 2 else None
    nseq = None
    if seq_ids is None and len(shape) == 2:
        seq_ids = torch.arange(shape[0], device=advantages.device)[:, None].expand(shape)
        nseq = shape[0]  # dense by construction: aggregation needs no torch.unique (a sort and a sync)
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    adv = flat(advantages)
    m = torch.ones_like(adv, dtype=torch.bool) if mask is None else flat(mask).bool()
    if offline is None:
        # one-branch estimators: every token belongs to the branch that exists; else all on-policy
        off = torch.full_like(m, estimator.online is None)
    else:
        off = flat(offline).bool()
    for side, sel in (("online", ~off), ("offline", off)):
        if getattr(estimator, side) is None and offline is not None:
            checks.append(((sel & m).any(), f"offline= marks {side} tokens but estimator {estimator.name!r} has "
                                            f"no {side} branch"))
    if estimator.online is not None and estimator.online.needs_old and old_logp is None:
        checks.append(((~off & m).any(), f"old_logp= is required: estimator {estimator.name!r} uses ref="
                                         f"{estimator.online.ref!r} on on-policy tokens (pass logp.detach() for a "
                                         "single update)"))
    if estimator.entropy_coef != 0 and entropy is None and not entropy_in_kernel:
        raise ValueError("entropy= is required when Estimator.entropy_coef != 0 (token_logprobs(..., return_entropy=True))")
    if estimator.kl_coef != 0 and ref_logp is None:
        raise ValueError("ref_logp= is required when Estimator.kl_coef != 0")
    if estimator.sequence_level and seq_ids is None:
        raise ValueError("seq_ids= is required for sequence-level estimators (gspo) with 1-D log-probs")
    # a branch with advantage 'one' uses A = 1 on its tokens, whatever the caller's tensor holds there (an HPT batch
    # carries GRPO advantages; they must not weight the demonstration tokens)
    one_on = estimator.online is not None and not estimator.online.needs_advantages
    one_off = estimator.offline is not None and not estimator.offline.needs_advantages
    if one_on and one_off:
        adv = torch.ones_like(adv)
    elif one_on or one_off:
        adv = torch.where(off if one_off else ~off, torch.ones_like(adv), adv)
    coef_on = estimator.online.coef if estimator.online is not None else 0.0
    coef_off = estimator.offline.coef if estimator.offline is not None else 0.0
    w = torch.where(off, torch.as_tensor(coef_off, dtype=adv.dtype, device=adv.device),
                    torch.as_tensor(coef_on, dtype=adv.dtype, device=adv.device))
    if weight is not None:
        w = w * flat(weight).to(adv.dtype)
    if not deferred:
        raise_failed_checks(checks)
    return dict(adv=adv, old=flat(old_logp), mask=m, offline=off, seq=flat(seq_ids), weight=w,
                entropy=flat(entropy), ref=flat(ref_logp), padded_len=padded_len, nseq=nseq)


def sequence_ratio(l: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """GSPO's s_i = exp(mean over the sequence's masked tokens of (l - old)), broadcast to tokens (no grad)."""
    seq, nseq = _dense_ids(seq_ids)
    mf = mask.to(l.dtype)
    d = ((l.detach() - old) * mf)
    tot = torch.zeros(nseq, dtype=l.dtype, device=l.device).index_add_(0, seq, d)
    cnt = torch.zeros(nseq, dtype=l.dtype, device=l.device).index_add_(0, seq, mf).clamp_min(1.0)
    return torch.exp(tot / cnt)[seq]


def policy_loss(logp: torch.Tensor, estimator: Estimator, *, advantages=None, old_logp=None, mask=None, offline=None,
                seq_ids=None, weight=None, entropy=None, ref_logp=None, agg: str | None = None):
    """Scalar loss of the unified estimator from per-token log-probs (any source), and a metrics dict.

    logp:       (N,) or (B, T) log pi_theta(y_t) at the sampling temperature, differentiable
    advantages: same shape, A per token (broadcast sequence advantages yourself: fastupg.advantages.to_tokens);
                ignored (A = 1) on tokens of a branch with advantage 'one'; optional when every branch has it (SFT)
    old_logp:   behaviour-policy log-probs; required where a branch uses ref='old'/'seq'
    mask:       tokens that count (bool/0-1); offline: True marks demonstration tokens
    seq_ids:    sequence id per token (1-D inputs; rows of a 2-D input are the sequences)
    weight:     per-token weight >= 0 (HPT alpha/beta); entropy/ref_logp: for the entropy bonus / KL term
    agg:        override Estimator.agg for this call

    An all-masked batch gives a zero loss with a zero gradient (not NaN).
    Metrics are detached 0-d tensors: loss/online, loss/offline, clip_ratio/{low,high,dual}, ratio/mean,
    entropy, kl, tokens/{online,offline}.
    """
    if not isinstance(logp, torch.Tensor) or not logp.is_floating_point():
        raise TypeError(f"logp must be a floating-point torch.Tensor, got {getattr(logp, 'dtype', type(logp))}")
    checks = [((~torch.isfinite(logp.detach())).any(), "logp contains non-finite values (nan/inf)")]
    x = prepare_inputs(logp.shape, estimator, advantages=advantages, old_logp=old_logp, mask=mask, offline=offline,
                       seq_ids=seq_ids, weight=weight, entropy=entropy, ref_logp=ref_logp, device=logp.device,
                       checks=checks)
    raise_failed_checks(checks)
    l = logp.reshape(-1)
    dt = l.dtype
    A = x["adv"].to(dt)
    old = x["old"].to(dt) if x["old"] is not None else None
    m, off = x["mask"], x["offline"]
    s = aggregation_weights(estimator, m, off, x["seq"], agg, x["padded_len"], x["nseq"]).to(dt) * x["weight"].to(dt)

    pg = torch.zeros_like(l)
    low = torch.zeros_like(m)
    high, dual = low.clone(), low.clone()
    ratio_sum = l.new_zeros(())
    for is_off in (False, True):
        b = estimator.branch(is_off)
        sel = (off == is_off)
        if b is None:  # (no `sel.any()` skip: a host sync costs more than the O(N) branch math)
            continue
        sr = None
        if b.ref == "seq":
            sr = sequence_ratio(l, old, m & sel, x["seq"])
        # safe_old keeps exp(l - old) finite on rows that don't use it (offline rows have no old_logp)
        # (and on masked rows, whose old_logp may be padding garbage: exp would overflow and 0 * inf = nan)
        safe_old = torch.where(sel & m, old, l.detach()) if old is not None else l.detach()
        loss_b, lo_b, hi_b, du_b, r = _branch_pg(estimator, b, l, A, safe_old, sr, {})
        pg = torch.where(sel, loss_b, pg)
        low |= lo_b & sel
        high |= hi_b & sel
        dual |= du_b & sel
        if r is not None:
            ratio_sum = ratio_sum + (r.detach() * (sel & m)).sum()
    tok = pg
    ent = x["entropy"]
    if estimator.entropy_coef != 0:
        tok = tok - estimator.entropy_coef * ent.to(dt)
    kl = None
    if x["ref"] is not None:
        kl = _kl(l, x["ref"].to(dt), estimator.kl_estimator)
        if estimator.kl_coef != 0:
            tok = tok + estimator.kl_coef * kl
    # where() rather than multiply: a masked token's loss may be inf (e.g. exp overflow) and 0*inf is nan
    contrib = torch.where(s != 0, s * tok, torch.zeros_like(tok))
    loss = contrib.sum()

    with torch.no_grad():
        mf = m.to(dt)
        n_on = (mf * (~off)).sum()
        n_off = (mf * off).sum()
        ratio_den = n_on if (estimator.online is not None and estimator.online.ref != "policy") else l.new_zeros(())
        metrics = {
            "loss": loss.detach(),
            "loss/online": (contrib * (~off)).sum().detach(),
            "loss/offline": (contrib * off).sum().detach(),
            "clip_ratio/low": (low & m).sum() / n_on.clamp_min(1),
            "clip_ratio/high": (high & m).sum() / n_on.clamp_min(1),
            "clip_ratio/dual": (dual & m).sum() / n_on.clamp_min(1),
            "ratio/mean": ratio_sum / ratio_den.clamp_min(1),
            "entropy": (ent.to(dt) * mf).sum() / mf.sum().clamp_min(1) if ent is not None else l.new_zeros(()),
            "kl": (kl.detach() * mf).sum() / mf.sum().clamp_min(1) if kl is not None else l.new_zeros(()),
            "tokens/online": n_on,
            "tokens/offline": n_off,
        }
    return loss, metrics
