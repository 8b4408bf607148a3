"""vLLM behind the rollout protocol (fastupg.rollout.base), colocated with the trainer.

Targets vLLM 0.10.2 - 0.12 (``pip install fastupg[vllm]``), the range TRL's colocate mode uses:

- Colocation: with ``VLLMConfig(colocate=True)`` under ``torchrun`` every rank builds its own
  engine inside its own process with ``distributed_executor_backend="external_launcher"``
  (vLLM then joins the ranks' torch.distributed world instead of spawning workers). With
  tensor parallelism the ranks of one TP group must run the same prompts with the same seed:
  :meth:`VLLMRolloutEngine.generate` gathers the group's prompts, generates them all and keeps
  this rank's share, as TRL's GRPOTrainer does.
- Memory: ``enable_sleep_mode=True`` lets :meth:`sleep` free the KV cache (level 1 also offloads
  the weights to CPU; level 2 drops them, so a weight sync must follow) while the trainer steps,
  and :meth:`wake_up` bring it back.
- Weights: :meth:`sync_weights` takes (HF name, full tensor) pairs - the trainer gathers one
  FSDP2 parameter at a time (``DTensor.full_tensor()``) - and loads them straight into the
  engine's model with the model's own ``load_weights`` (which handles vLLM's fused qkv /
  gate_up layouts), no disk round trip; the prefix cache is reset afterwards. Access path as in
  TRL's ``_move_model_to_vllm``: ``llm.llm_engine.model_executor.driver_worker.model_runner.model``
  (in-process engine), falling back to ``llm.collective_rpc`` / ``llm.apply_model`` on versions
  where that attribute chain is gone.
- Log-probs: ``logprobs_mode="processed_logprobs"`` (an engine argument since vLLM 0.10.2) makes
  the returned log-prob of each sampled token the one of the distribution it was sampled from,
  temperature applied (raw logits would ignore the temperature); ``SamplingParams(logprobs=0)``
  asks for just the sampled token's. Note: processed also means after top-p/top-k truncation,
  while fastupg's HF engine and trainer use the full softmax at temperature T; with top_p=1 and
  top_k off (the HPT training setting) the two agree. See :func:`is_correction` for correcting
  the remaining engine/trainer mismatch.
- Truncation: ``Rollout.truncated`` is ``finish_reason == "length"``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from .base import Rollout, SamplingConfig

__all__ = [
    "VLLMConfig", "VLLMRolloutEngine", "build_llm_kwargs", "build_sampling_kwargs",
    "parse_request_outputs", "vllm_weight_name", "is_correction", "IS_MODES", "iter_full_state",
]

_INSTALL_HINT = "vLLM is not installed: pip install fastupg[vllm]  (vllm>=0.10.2,<0.13; needs a CUDA GPU)"


@dataclass(frozen=True)
class VLLMConfig:
    model: str                                  # HF checkpoint path or name the engine starts from
    tokenizer: str | None = None
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5         # colocated with training: leave room for the trainer
    max_model_len: int | None = None            # prompt + completion tokens
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enable_sleep_mode: bool = False
    sleep_level: int = 1                        # 1: offload weights to CPU, free KV; 2: drop both
    colocate: bool = False                      # one engine per torchrun rank (external_launcher)
    seed: int = 0
    enforce_eager: bool = False
    return_logprobs: bool = True
    weight_sync_chunk: int = 16                 # parameters per load_weights call
    extra: tuple[tuple[str, Any], ...] = field(default_factory=tuple)  # more vllm.LLM kwargs

    def __post_init__(self):
        if not self.model:
            raise ValueError("VLLMConfig.model must name a checkpoint")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"VLLMConfig.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"VLLMConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"VLLMConfig.sleep_level must be 1 or 2, got {self.sleep_level}")
        if self.weight_sync_chunk < 1:
            raise ValueError(f"VLLMConfig.weight_sync_chunk must be >= 1, got {self.weight_sync_chunk}")


# ----------------------------------------------------------------------------------------------
# pure helpers (unit-tested without vLLM)
# ----------------------------------------------------------------------------------------------

def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def build_llm_kwargs(cfg: VLLMConfig, vllm_version: str = "0.10.2", rank: int = 0,
                     engine_arg_names: Iterable[str] | None = None) -> dict:
    """kwargs for ``vllm.LLM``.

    rank: this process's global rank (colocate mode): ranks of one TP group share a seed, as
    external_launcher requires that they sample identically. engine_arg_names: the installed
    EngineArgs fields, to drop what this vLLM does not know (None: trust `vllm_version`).
    """
    kw: dict[str, Any] = dict(
        model=cfg.model, tokenizer=cfg.tokenizer or cfg.model, dtype=cfg.dtype,
        tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
        enable_prefix_caching=cfg.enable_prefix_caching, enable_sleep_mode=cfg.enable_sleep_mode,
        enforce_eager=cfg.enforce_eager, seed=cfg.seed,
    )
    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(cfg, name) is not None:
            kw[name] = getattr(cfg, name)
    if cfg.colocate:
        kw["distributed_executor_backend"] = "external_launcher"
        kw["seed"] = cfg.seed + rank // cfg.tensor_parallel_size
    if cfg.return_logprobs and _version_tuple(vllm_version) >= (0, 10, 2):
        kw["logprobs_mode"] = "processed_logprobs"
    kw.update(dict(cfg.extra))
    if engine_arg_names is not None:
        known = set(engine_arg_names) | {"model", "tokenizer"}
        dropped = sorted(k for k in kw if k not in known)
        if "logprobs_mode" in dropped and cfg.return_logprobs:
            import warnings

            warnings.warn("this vLLM has no logprobs_mode: returned log-probs are of the raw logits, "
                          "without temperature; upgrade to vllm>=0.10.2", stacklevel=2)
        kw = {k: v for k, v in kw.items() if k in known}
    return kw


def build_sampling_kwargs(sampling: SamplingConfig, return_logprobs: bool = True) -> dict:
    """kwargs for ``vllm.SamplingParams`` from the protocol's SamplingConfig."""
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    kw: dict[str, Any] = dict(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                              max_tokens=sampling.max_new_tokens)
    if sampling.top_k > 0:
        kw["top_k"] = sampling.top_k      # off otherwise: vLLM's default (-1 / 0 by version)
    if sampling.seed is not None:
        kw["seed"] = sampling.seed
    if sampling.stop_token_ids:
        kw["stop_token_ids"] = list(sampling.stop_token_ids)
    if return_logprobs:
        kw["logprobs"] = 0                # the sampled token's log-prob only
    return kw


def _token_logprob(entry: Any, token_id: int) -> float:
    """Log-prob of `token_id` in one position's logprobs entry (dict id -> Logprob or float)."""
    if isinstance(entry, dict):
        v = entry.get(token_id)
        if v is None:
            raise ValueError(f"vLLM returned no log-prob for the sampled token {token_id}")
        return float(getattr(v, "logprob", v))
    return float(getattr(entry, "logprob", entry))


def parse_request_outputs(outputs: Sequence[Any], prompts: Sequence[list[int]],
                          with_logprobs: bool = True) -> list[list[Rollout]]:
    """vLLM ``RequestOutput`` s (in prompt order) -> one list of Rollouts per prompt."""
    if len(outputs) != len(prompts):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    result: list[list[Rollout]] = []
    for req, prompt in zip(outputs, prompts):
        rolls = []
        for comp in req.outputs:
            ids = [int(t) for t in comp.token_ids]
            lps = None
            if with_logprobs:
                raw = getattr(comp, "logprobs", None)
                if raw is None:
                    raise ValueError("vLLM returned no log-probs; build SamplingParams with logprobs=0")
                if len(raw) != len(ids):
                    raise ValueError(f"vLLM returned {len(raw)} log-probs for {len(ids)} tokens")
                lps = [_token_logprob(raw[t], tid) for t, tid in enumerate(ids)]
            reason = getattr(comp, "finish_reason", None)
            rolls.append(Rollout(
                prompt_ids=list(prompt), completion_ids=ids, logprobs=lps,
                truncated=(reason == "length"), text=getattr(comp, "text", "") or "",
                extra={"finish_reason": reason, "stop_reason": getattr(comp, "stop_reason", None)},
            ))
        result.append(rolls)
    return result


# wrappers that FSDP2 / torch.compile / activation checkpointing / DDP put into parameter names
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module", "module")


def vllm_weight_name(name: str, strip_prefixes: Sequence[str] = ()) -> str:
    """HF state-dict name as the trainer holds it -> the name vLLM's ``load_weights`` expects.

    Drops wrapper path parts (``_orig_mod.``, ``_checkpoint_wrapped_module.``,
    ``_fsdp_wrapped_module.``, a DDP ``module.``) anywhere in the name and any caller-given
    prefixes (e.g. ``base_model.model.`` of PEFT). vLLM's own ``load_weights`` maps the
    remaining HF names (``model.layers.0.self_attn.q_proj.weight``) onto its fused layers.
    """
    for p in strip_prefixes:
        if p and name.startswith(p):
            name = name[len(p):]
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS[:3]]
    # a DDP-style leading "module." only: "module" can also be a real submodule name deeper in
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def iter_full_state(model: torch.nn.Module):
    """(name, full tensor) for every state-dict entry, gathering one FSDP2 shard at a time.

    ``DTensor.full_tensor()`` is a collective: every rank must run this loop in step (the
    state-dict order is the same on all ranks). Peak extra memory is one full parameter.
    Feed it to :meth:`VLLMRolloutEngine.sync_weights`.
    """
    for name, t in model.state_dict().items():
        yield name, (t.full_tensor() if hasattr(t, "full_tensor") else t)


IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def is_correction(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                  seq_ids: torch.Tensor | None = None, mode: str = "token_truncate",
                  cap: float = 2.0) -> torch.Tensor:
    """Per-token importance weights correcting the sampler (vLLM) / trainer mismatch.

    ratio = exp(trainer_logp - sampler_logp), per token (``token_*``) or per sequence
    (``sequence_*``: exp of the SUM of the masked token differences, TRL's definition).
    ``*_truncate`` caps the ratio at `cap` (truncated IS); ``*_mask`` sets weights above `cap`
    to 0. Names as TRL's ``vllm_importance_sampling_mode`` / ``_cap``. Multiply each token's
    loss by the returned weight (no gradient flows through it). Masked tokens get weight 0.

    Shapes: [B, T] with `mask` [B, T] (rows are sequences), or packed [N] with `seq_ids` [N]
    naming each token's sequence (any integers).
    """
    if mode not in IS_MODES:
        raise ValueError(f"is_correction: mode must be one of {IS_MODES}, got {mode!r}")
    if not cap > 0:
        raise ValueError(f"is_correction: cap must be > 0, got {cap}")
    if trainer_logp.shape != sampler_logp.shape or trainer_logp.shape != mask.shape:
        raise ValueError(f"is_correction: shapes differ: trainer {tuple(trainer_logp.shape)}, "
                         f"sampler {tuple(sampler_logp.shape)}, mask {tuple(mask.shape)}")
    m = mask.to(torch.float32)
    diff = (trainer_logp.detach().float() - sampler_logp.detach().float()) * m
    if mode.startswith("token"):
        log_ratio = diff
    elif seq_ids is None:
        if diff.dim() != 2:
            raise ValueError("is_correction: sequence modes need [B, T] inputs or seq_ids")
        log_ratio = diff.sum(dim=-1, keepdim=True).expand_as(diff)
    else:
        if seq_ids.shape != diff.shape or diff.dim() != 1:
            raise ValueError("is_correction: seq_ids must be [N] like the packed log-probs")
        uniq, inv = torch.unique(seq_ids, return_inverse=True)
        per_seq = torch.zeros(len(uniq), dtype=diff.dtype, device=diff.device).index_add_(0, inv, diff)
        log_ratio = per_seq[inv]
    # clamp the exponent: a huge mismatch must give a huge (then capped/masked) ratio, never inf*0
    ratio = torch.exp(log_ratio.clamp(max=80.0))
    if mode.endswith("truncate"):
        w = ratio.clamp(max=cap)
    else:
        w = torch.where(ratio <= cap, ratio, torch.zeros_like(ratio))
    return w * m


# ----------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------

def _import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return vllm


class VLLMRolloutEngine:
    """A ``vllm.LLM`` behind generate / sync_weights / sleep / wake_up."""

    def __init__(self, cfg: VLLMConfig, tokenizer=None):
        if not isinstance(cfg, VLLMConfig):
            raise TypeError(f"cfg must be a VLLMConfig, got {type(cfg).__name__}")
        vllm = _import_vllm()
        if not torch.cuda.is_available():
            raise RuntimeError("VLLMRolloutEngine needs a CUDA GPU; use fastupg.rollout.hf.HFRolloutEngine on CPU")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.rank, self.world = 0, 1
        self._tp_group = None
        if cfg.colocate:
            if not torch.distributed.is_initialized():
                raise RuntimeError("VLLMConfig(colocate=True) needs torch.distributed initialised (run under torchrun)")
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            if self.world % cfg.tensor_parallel_size:
                raise ValueError(f"world size {self.world} is not a multiple of tensor_parallel_size "
                                 f"{cfg.tensor_parallel_size}")
            # the engine must live in this process for load_weights to reach it
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            if cfg.tensor_parallel_size > 1:
                self._tp_group, _ = torch.distributed.new_subgroups_by_enumeration([
                    list(range(s, s + cfg.tensor_parallel_size))
                    for s in range(0, self.world, cfg.tensor_parallel_size)
                ])
        try:
            from vllm.engine.arg_utils import EngineArgs
            import dataclasses

            names = [f.name for f in dataclasses.fields(EngineArgs)]
        except Exception:
            names = None
        kwargs = build_llm_kwargs(cfg, vllm.__version__, self.rank, names)
        self._sampling_cls = vllm.SamplingParams
        self.llm = vllm.LLM(**kwargs)
        self._asleep = False

    # ------------------------------------------------------------------ protocol
    def generate(self, prompts: Sequence[list[int]], sampling: SamplingConfig) -> list[list[Rollout]]:
        prompts = [list(map(int, p)) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        if self._asleep:
            raise RuntimeError("VLLMRolloutEngine.generate called while asleep; call wake_up() first")
        all_prompts, mine = prompts, slice(0, len(prompts))
        if self._tp_group is not None:
            # every rank of a TP group must run the same requests: gather, generate, keep ours
            gathered: list[Any] = [None] * self.cfg.tensor_parallel_size
            torch.distributed.all_gather_object(gathered, prompts, group=self._tp_group)
            local = self.rank % self.cfg.tensor_parallel_size
            start = sum(len(g) for g in gathered[:local])
            all_prompts = [p for g in gathered for p in g]
            mine = slice(start, start + len(prompts))
        params = self._sampling_cls(**build_sampling_kwargs(sampling, self.cfg.return_logprobs))
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in all_prompts],
                                    sampling_params=params, use_tqdm=False)
        return parse_request_outputs(outputs, all_prompts, self.cfg.return_logprobs)[mine]

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], strip_prefixes: Sequence[str] = ()) -> None:
        load = self._loader()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        batch: list[tuple[str, torch.Tensor]] = []
        for name, t in named_tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"sync_weights: {name} is a {type(t).__name__}, not a tensor")
            full = t.full_tensor() if hasattr(t, "full_tensor") else t   # a DTensor the caller did not gather
            full = full.detach() if device is None else full.detach().to(device, non_blocking=True)
            batch.append((vllm_weight_name(name, strip_prefixes), full))
            if len(batch) >= self.cfg.weight_sync_chunk:
                load(batch)
                batch = []
        if batch:
            load(batch)
        # cached KV blocks were computed with the old weights
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None:
            reset()

    def sleep(self) -> None:
        if self.cfg.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=self.cfg.sleep_level)
            self._asleep = True

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Wake all (default) or only some memory: tags=["weights"] before a weight sync, then ["kv_cache"]."""
        if not self.cfg.enable_sleep_mode or not self._asleep:
            return
        if tags is None:
            self.llm.wake_up()
            self._asleep = False
        else:
            self.llm.wake_up(tags=list(tags))
            if "kv_cache" in tags:
                self._asleep = False

    # ------------------------------------------------------------------ internals
    def _loader(self):
        """load_weights of the engine's model, through whichever path this vLLM offers."""
        try:
            model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
            return model.load_weights
        except AttributeError:
            pass
        if hasattr(self.llm, "collective_rpc"):
            # the callable runs on every worker (pickled by value when workers are processes)
            def rpc(batch):
                def _load(worker, weights):
                    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
                    runner.model.load_weights(weights)
                self.llm.collective_rpc(_load, args=(batch,))
            return rpc
        if hasattr(self.llm, "apply_model"):
            return lambda batch: self.llm.apply_model(lambda m: m.load_weights(batch))
        raise RuntimeError("cannot reach the vLLM model to load weights into (unsupported vLLM version)")
