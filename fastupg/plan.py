"""`fastupg plan`: the per-GPU memory budget of a recipe, before anything is loaded.

    fastupg plan --config configs/qwen2.5-math-7b-hpt.yaml                 # 8 x 80 GB (the default)
    fastupg plan --config configs/qwen2.5-math-1.5b-hpt.yaml --gpus 1      # one GPU
    fastupg plan --config configs/qwen2.5-math-7b-hpt.yaml --gpus 8 --gpu-gb 141 max_tokens_per_microbatch=65536

The model's shapes come from its config.json when `model` is a local folder, else from a built-in table of the
recipes' models (nothing is downloaded). A recipe that cannot fit (or whose prompt + completion exceeds the model's
context) is refused with one line on stderr and exit code 2.

What is counted (GiB per GPU), and how. These are estimates from shapes, not measurements:
  parameters     fp32 master weights (torch_dtype auto; bf16 with torch_dtype=bfloat16), sharded 1/N under FSDP
  gradients      same dtype and sharding as the parameters (FSDP reduce-scatters in fp32)
  Adam state     two fp32 moments (exp_avg, exp_avg_sq), sharded 1/N
  unsharded      FSDP: the bf16 all-gathered root unit (embeddings, lm_head, final norm; alive for the whole step)
                 plus two decoder layers (the current one and the prefetched one) and their bf16 gradients.
                 One GPU under autocast: the bf16 casts of the weights autocast caches during the forward.
  activations    gradient checkpointing on: each layer's input (hidden size x tokens of the micro-batch budget) for
                 all layers, plus one layer's recomputed forward + backward working set
                 (~ 2 x (8 D + 2 kv + 4 I) values per token, sdpa/flash attention being O(tokens));
                 without checkpointing all layers' working sets. 4-byte activations on one GPU with fp32 weights
                 (the residual stream stays fp32 under autocast), 2-byte under FSDP's bf16 mixed precision.
  loss chunk     the fused-linear loss: about two chunks of fp32 logits (loss_chunk_mb each) + the lm_head gradient
                 accumulator (V x D fp32) + the response hidden states and their gradient
  packed mask    sdpa/eager on packed rows: a tokens x tokens boolean mask per micro-batch (counted unless
                 attn_implementation=flash_attention_2, which uses varlen offsets)
  vLLM           rollout_engine=vllm: vllm_gpu_memory_utilization x GPU memory while generating (the trainer's
                 parameters, gradients-free, and Adam state stay resident then); ~1 GiB while it sleeps
  HF generate    rollout_engine=hf: the KV cache of per_device_train_batch_size sequences of prompt + completion
The two phases (training step; generation) must each fit in the GPU's memory less a reserve for the CUDA context
and allocator fragmentation (--reserve-gb, 3 by default).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

GIB = 2 ** 30


@dataclass(frozen=True)
class ModelShape:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    source: str = "built-in table"

    @property
    def kv_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads * self.num_key_value_heads

    @property
    def layer_params(self) -> int:
        D, I, kv = self.hidden_size, self.intermediate_size, self.kv_dim
        attn = D * D * 2 + D * kv * 2 + ((D + 2 * kv) if self.qkv_bias else 0)
        return attn + 3 * D * I + 2 * D

    @property
    def root_params(self) -> int:
        """Embeddings, lm_head (unless tied) and the final norm: FSDP's root unit."""
        emb = self.vocab_size * self.hidden_size
        return emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    @property
    def params(self) -> int:
        return self.root_params + self.num_hidden_layers * self.layer_params


def _shape(name, V, D, I, L, H, KV, ctx, tied, bias):
    return ModelShape(name, V, D, I, L, H, KV, ctx, tied, bias)


# The recipes' models, from their published config.json files (shapes only; no weights involved).
BUILTIN = {
    "qwen2.5-math-1.5b": _shape("Qwen/Qwen2.5-Math-1.5B", 151936, 1536, 8960, 28, 12, 2, 4096, True, True),
    "qwen2.5-math-7b": _shape("Qwen/Qwen2.5-Math-7B", 152064, 3584, 18944, 28, 28, 4, 4096, False, True),
    "llama-3.1-8b": _shape("meta-llama/Llama-3.1-8B", 128256, 4096, 14336, 32, 32, 8, 131072, False, False),
    "qwen2.5-1.5b": _shape("Qwen/Qwen2.5-1.5B", 151936, 1536, 8960, 28, 12, 2, 131072, True, True),
}


def shape_from_config_dict(c: dict, name: str, source: str) -> ModelShape:
    c = c.get("text_config", c)
    return ModelShape(name=name, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                      intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
                      num_attention_heads=c["num_attention_heads"],
                      num_key_value_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                      max_position_embeddings=c.get("max_position_embeddings", 0),
                      tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                      qkv_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")), source=source)


def model_shape(model: str, model_size: str = "tiny") -> ModelShape:
    """Shapes of `model`: its config.json if it is a local folder, else the built-in table. ValueError if unknown."""
    if model == "embedded":
        from fastupg.task.tiny import SIZES
        c = SIZES[model_size]
        return ModelShape(f"embedded ({model_size})", 262, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                          c.num_attention_heads, c.num_key_value_heads, c.max_position_embeddings, True, False,
                          source="fastupg.task.tiny")
    cfg_file = Path(model) / "config.json"
    if cfg_file.is_file():
        return shape_from_config_dict(json.loads(cfg_file.read_text()), model, str(cfg_file))
    key = model.rstrip("/").split("/")[-1].lower()
    if key in BUILTIN:
        return BUILTIN[key]
    raise ValueError(f"model {model!r}: no local config.json and not in the built-in table "
                     f"({', '.join(s.name for s in BUILTIN.values())})")


@dataclass(frozen=True)
class Budget:
    rows: tuple            # (label, bytes) of the training phase
    train_bytes: int
    gen_rows: tuple        # (label, bytes) of the generation phase
    gen_bytes: int
    usable_bytes: int
    context: int           # the model's context after the recipe's override
    needed_context: int    # max_prompt_length + max_completion_length


def budget(cfg, shape: ModelShape, gpus: int, gpu_gb: float, reserve_gb: float = 3.0) -> Budget:
    P = shape.params
    sharded = gpus > 1 and cfg.fsdp
    w = gpus if sharded else 1
    pbytes = 2 if cfg.torch_dtype == "bfloat16" else 4
    params = P * pbytes / w
    grads = P * pbytes / w
    adam = P * 8 / w
    if sharded:
        unsharded = (shape.root_params + 2 * shape.layer_params) * 2 * 2   # bf16 params + their bf16 grads
    else:
        unsharded = P * 2 if pbytes == 4 else 0                           # autocast's bf16 weight casts
    T = cfg.max_tokens_per_microbatch
    D, I, kv, L, V = shape.hidden_size, shape.intermediate_size, shape.kv_dim, shape.num_hidden_layers, shape.vocab_size
    abytes = 2 if (sharded or pbytes == 2) else 4
    layer_work = T * 2 * (8 * D + 2 * kv + 4 * I) * abytes
    acts = (L * T * D * abytes + layer_work) if cfg.gradient_checkpointing else L * layer_work
    chunk = min(cfg.loss_chunk_mb * 2 ** 20, T * V * 4)   # the chunk never exceeds the micro-batch's logits
    loss = 2 * chunk + V * D * 4 + 2 * T * D * 2
    # packed rows through sdpa/eager: transformers builds a (T x T) boolean block-diagonal mask per micro-batch;
    # flash_attention_2 uses varlen offsets instead ("auto" picks it when flash-attn is installed: not known here)
    mask = T * T if cfg.attn_implementation != "flash_attention_2" else 0
    rows = (("parameters", params), ("gradients", grads), ("Adam state", adam),
            ("unsharded weights (transient)", unsharded), ("activations", acts), ("loss chunk", loss),
            ("packed-row mask (sdpa, not flash)", mask))
    if cfg.rollout_engine == "vllm":
        rows += (("vLLM asleep", 1 * GIB),)
        gen_engine = ("vLLM (gpu_memory_utilization)", cfg.vllm_gpu_memory_utilization * gpu_gb * 1e9)
        gen_rows = (("parameters", params), ("Adam state", adam), gen_engine)
    else:
        seq = cfg.max_prompt_length + cfg.max_completion_length
        kv_cache = cfg.per_device_train_batch_size * seq * L * 2 * kv * 2
        gen_rows = (("parameters", params), ("Adam state", adam),
                    ("gathered bf16 weights" if sharded else "weights cast", P * 2 if (sharded or pbytes == 4) else 0),
                    ("HF generate KV cache", kv_cache))
    ctx = cfg.max_position_embeddings or shape.max_position_embeddings
    if cfg.model == "embedded":   # its arithmetic prompts are a few dozen tokens; max_prompt_length is only a cap
        ctx = 0
    return Budget(rows=rows, train_bytes=int(sum(b for _, b in rows)), gen_rows=gen_rows,
                  gen_bytes=int(sum(b for _, b in gen_rows)), usable_bytes=int((gpu_gb - reserve_gb) * 1e9),
                  context=ctx, needed_context=cfg.max_prompt_length + cfg.max_completion_length)


def render(cfg, shape: ModelShape, b: Budget, gpus: int, gpu_gb: float, config_name: str) -> str:
    sharded = gpus > 1 and cfg.fsdp
    how = "FSDP2, bf16 compute" if sharded else "one process, bf16 autocast"
    out = [f"fastupg plan: {config_name} on {gpus} x {gpu_gb:g} GB ({how}; estimates from shapes, not measured)",
           f"model {shape.name}: {shape.params / 1e9:.2f} B parameters (layers {shape.num_hidden_layers}, hidden "
           f"{shape.hidden_size}, mlp {shape.intermediate_size}, vocab {shape.vocab_size}, "
           f"{'tied' if shape.tie_word_embeddings else 'untied'} head) from {shape.source}",
           f"context: {b.needed_context} tokens needed (prompt {cfg.max_prompt_length} + completion "
           f"{cfg.max_completion_length}), model allows {b.context or 'n/a (embedded task: short prompts)'}"
           + (f" (max_position_embeddings override, rope_theta {cfg.rope_theta:g})"
              if cfg.max_position_embeddings and cfg.rope_theta else
              " (max_position_embeddings override)" if cfg.max_position_embeddings else ""),
           f"training step: micro-batch budget {cfg.max_tokens_per_microbatch} tokens, gradient checkpointing "
           f"{'on' if cfg.gradient_checkpointing else 'off'}, loss chunk {cfg.loss_chunk_mb} MiB",
           f"  {'':38s} GiB/GPU"]
    for label, v in b.rows:
        out.append(f"  {label:38s} {v / GIB:7.2f}")
    out.append(f"  {'= training peak':38s} {b.train_bytes / GIB:7.2f}")
    out.append(f"generation ({cfg.rollout_engine}):")
    for label, v in b.gen_rows:
        out.append(f"  {label:38s} {v / GIB:7.2f}")
    out.append(f"  {'= generation peak':38s} {b.gen_bytes / GIB:7.2f}")
    out.append(f"usable per GPU: {b.usable_bytes / GIB:.2f} GiB ({gpu_gb:g} GB less the reserve)")
    return "\n".join(out)


def problems(b: Budget) -> list[str]:
    out = []
    if b.context and b.needed_context > b.context:
        out.append(f"prompt + completion = {b.needed_context} tokens exceeds the model's context {b.context} "
                   "(set max_position_embeddings / rope_theta in the recipe, or shorten max_completion_length)")
    if b.train_bytes > b.usable_bytes:
        out.append(f"the training step needs {b.train_bytes / GIB:.1f} GiB per GPU, {b.usable_bytes / GIB:.1f} "
                   "usable (lower max_tokens_per_microbatch, turn on gradient_checkpointing, or use more GPUs)")
    if b.gen_bytes > b.usable_bytes:
        out.append(f"generation needs {b.gen_bytes / GIB:.1f} GiB per GPU, {b.usable_bytes / GIB:.1f} usable "
                   "(lower vllm_gpu_memory_utilization / per_device_train_batch_size, or use more GPUs)")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastupg plan", description="per-GPU memory budget of a recipe (nothing loaded)")
    p.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml)")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8; 1: one process, no FSDP)")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="memory per GPU in GB (default 80)")
    p.add_argument("--reserve-gb", type=float, default=3.0, help="kept free per GPU for CUDA context etc.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (fastupg/config.py names)")
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        if args.gpus < 1:
            raise ValueError(f"--gpus must be >= 1, got {args.gpus}")
        if not args.gpu_gb > args.reserve_gb >= 0:
            raise ValueError(f"--gpu-gb ({args.gpu_gb}) must exceed --reserve-gb ({args.reserve_gb}) >= 0")
        from fastupg.config import load_config
        cfg = load_config(args.config, args.overrides)
        shape = model_shape(cfg.model, cfg.model_size)
    except (ValueError, TypeError) as e:
        print(f"fastupg plan: {e}", file=sys.stderr)
        return 2
    b = budget(cfg, shape, args.gpus, args.gpu_gb, args.reserve_gb)
    print(render(cfg, shape, b, args.gpus, args.gpu_gb, args.config or "(defaults)"))
    bad = problems(b)
    if bad:
        print(f"fastupg plan: does not fit: {'; '.join(bad)}", file=sys.stderr)
        return 2
    print(f"fits: the larger phase uses {max(b.train_bytes, b.gen_bytes) / GIB:.1f} of "
          f"{b.usable_bytes / GIB:.1f} usable GiB per GPU")
    return 0
