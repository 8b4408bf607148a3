"""What a run is made of, loaded before the first step: its paths (the embedded task built once, or the user's
model and data), the tokenized data, the verifier, the model (with the recipe's context overrides and Liger's
kernels on GPU). Everything here runs once per stage; nothing here runs per step."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastupg import distributed as D
from fastupg.config import TrainConfig


@dataclass(frozen=True)
class RunPaths:
    model: str           # weights + tokenizer to start from
    train_file: str
    eval_file: str | None
    reward: str          # arith | math


def embedded_task(mix: tuple = (), n_train: int = 0):
    from fastupg.task import ArithConfig
    kw = {}
    if mix:
        kw["mix"] = tuple(mix)
    if n_train:
        kw["n_train"] = n_train
    return ArithConfig(seed=0, **kw)


def embedded_root(embedded_dir: str, size: str, mix: tuple = (), n_train: int = 0, base_steps: int = -1) -> Path:
    """One folder per task/model spec: a changed task definition or base recipe builds afresh instead of clashing."""
    import dataclasses
    import hashlib
    import json
    from fastupg.task.tiny import EMBEDDED_VERSION, base_recipe
    base = base_recipe(size, base_steps)
    spec = json.dumps([dataclasses.asdict(embedded_task(mix, n_train)), size, EMBEDDED_VERSION] +
                      ([dataclasses.asdict(base)] if base is not None else []), sort_keys=True)
    return Path(embedded_dir) / f"seed0-{size}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}"


def resolve_paths(cfg: TrainConfig, info: D.DistInfo) -> RunPaths:
    if cfg.model == "embedded":
        from fastupg.task.tiny import base_recipe, ensure_embedded
        root = embedded_root(cfg.embedded_dir, cfg.model_size, cfg.embedded_task_mix, cfg.embedded_n_train,
                             cfg.embedded_base_steps)
        if info.is_main:
            ensure_embedded(root, seed=0, size=cfg.model_size,
                            task=embedded_task(cfg.embedded_task_mix, cfg.embedded_n_train),
                            base=base_recipe(cfg.model_size, cfg.embedded_base_steps),
                            log=lambda s: print(s, flush=True))
        D.barrier(info)
        return RunPaths(model=str(root / "model"), train_file=cfg.train_file or str(root / "data" / "train.jsonl"),
                        eval_file=cfg.eval_file or str(root / "data" / "eval.jsonl"),
                        reward="arith" if cfg.reward == "auto" and cfg.train_file is None else cfg.reward)
    if cfg.train_file is None:
        raise ValueError("train_file is required when model is not 'embedded'")
    return RunPaths(model=cfg.model, train_file=cfg.train_file, eval_file=cfg.eval_file,
                    reward="math" if cfg.reward == "auto" else cfg.reward)


def load_data(path: str, tokenizer, cfg: TrainConfig, embedded: bool, need_demo: bool, need_answer: bool = True,
              log=None):
    """Tokenized examples, rows dropped as `fastupg data` shows (fastupg.data.datasets.train_data_config)."""
    from fastupg.data.datasets import DataError, load_examples_report, train_data_config
    ex, report = load_examples_report(path, tokenizer, train_data_config(cfg, embedded, need_demo, need_answer))
    if log is not None:
        log("[fastupg] " + report.format())
    if not ex:
        raise DataError(f"no usable examples in {path}: {report.summary()} (see the counts above)")
    return ex


def reward_fn(kind: str):
    if kind == "arith":
        from fastupg.task.verifier import arith_reward
        return lambda texts, golds: [arith_reward(t, g) for t, g in zip(texts, golds)]
    from fastupg.rewards.math import math_rewards
    return lambda texts, golds: list(math_rewards(texts, golds))


def model_config(path: str, cfg: TrainConfig):
    """The model's config with the recipe's context overrides (rope_theta, max_position_embeddings) applied."""
    from transformers import AutoConfig
    from fastupg.models.context import apply_context_overrides
    return apply_context_overrides(AutoConfig.from_pretrained(path), cfg.rope_theta, cfg.max_position_embeddings)


def load_model(path: str, cfg: TrainConfig, device: torch.device):
    from transformers import AutoModelForCausalLM
    attn = cfg.attn_implementation
    if attn == "auto":
        attn = "sdpa"
        if device.type == "cuda":
            try:
                import flash_attn  # noqa: F401  -- varlen attention over packed rows
                attn = "flash_attention_2"
            except ImportError:
                pass
    dtype = torch.bfloat16 if cfg.torch_dtype == "bfloat16" else torch.float32  # auto: fp32 master weights
    kw = {}
    if cfg.rope_theta is not None or cfg.max_position_embeddings is not None:
        kw["config"] = model_config(path, cfg)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn, **kw)
    model.config.use_cache = False  # training forward: no KV cache (it would also disable packed-row masking)
    return model.to(device)


def apply_liger(model, cfg: TrainConfig, device: torch.device, log) -> bool:
    """Liger-Kernel's RMSNorm / RoPE / SwiGLU patches on GPU when installed (its losses are not used:
    the fused policy loss is ours)."""
    if not cfg.use_liger_kernel or device.type != "cuda":
        return False
    try:
        import liger_kernel.transformers as lk
    except ImportError:
        return False
    fn = getattr(lk, f"apply_liger_kernel_to_{model.config.model_type}", None)
    if fn is None:
        log(f"[fastupg] liger-kernel has no patch for model_type={model.config.model_type!r}; skipping")
        return False
    fn(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    return True


def embedded_stage_cfg(cfg: TrainConfig) -> TrainConfig:
    """A later stage of an embedded recipe starts from a checkpoint but keeps the embedded data."""
    import dataclasses
    return dataclasses.replace(cfg, model="embedded", stages=())


def prepare_model(model, cfg: TrainConfig, info: D.DistInfo, log) -> bool:
    """The loaded policy made ready to train, in place: Liger's kernels (GPU), activation checkpointing, FSDP2
    sharding over the ranks. Returns whether it is sharded."""
    dev = info.device
    apply_liger(model, cfg, dev, log)
    sharded = info.distributed and cfg.fsdp
    if cfg.gradient_checkpointing:
        if sharded:
            D.apply_activation_checkpointing(model)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if sharded:
        D.shard_model(model, info, mixed_precision=dev.type == "cuda" and cfg.torch_dtype == "auto")
    elif info.distributed:
        raise ValueError("fsdp=false with more than one rank is not supported (use fsdp=true)")
    return sharded


def load_reference(path: str, cfg: TrainConfig, info: D.DistInfo, sharded: bool):
    """The frozen reference policy of the KL term (beta > 0); sharded like the policy, so each rank holds 1/world."""
    ref = load_model(path, cfg, info.device).eval().requires_grad_(False)
    if sharded:
        D.shard_model(ref, info, mixed_precision=info.device.type == "cuda" and cfg.torch_dtype == "auto")
    return ref
