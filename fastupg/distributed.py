"""Process groups and FSDP2 for the trainer; a no-op single process when not launched by torchrun.

    torchrun --nproc-per-node 8 -m fastupg train --config configs/hpt-paper.yaml      # one node
    torchrun --nnodes 2 --node-rank R --master-addr H --nproc-per-node 8 -m fastupg train ...

Backend: nccl on CUDA, gloo on CPU (the two-rank CPU test uses gloo). The model is sharded with
`torch.distributed.fsdp.fully_shard` per decoder layer and then at the root, with a
MixedPrecisionPolicy (bf16 compute, fp32 reduce) on GPU and activation checkpointing per layer
when asked. The trainer's loss is already normalised over the global batch, so it scales its local
loss by the world size: FSDP's average over ranks is then the gradient of the one big batch.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: str | None = None) -> DistInfo:
    """Join the process group torchrun (or the test's spawn) described in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max(x: int, info: DistInfo) -> int:
    if not info.distributed:
        return x
    t = torch.tensor([x], dtype=torch.long, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        t = t.clone()
        dist.all_reduce(t)
    return t


def broadcast_object(obj, info: DistInfo):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a Hugging Face causal LM (model.model.layers for Llama/Qwen2)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers on {type(model).__name__} (expected model.model.layers)")
    return list(layers)


def apply_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant, composes with FSDP2)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing as _apply, checkpoint_wrapper)
    layer_types = tuple({type(m) for m in decoder_layers(model)})
    _apply(model, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
           check_fn=lambda m: isinstance(m, layer_types))


def shard_model(model, info: DistInfo, mixed_precision: bool):
    """FSDP2: fully_shard every decoder layer, then the root. FSDP averages gradients over ranks; the
    trainer multiplies its (globally normalised) local loss by the world size to make that a sum (a divide
    factor of 1 would need PREMUL_SUM, which gloo lacks)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if mixed_precision else MixedPrecisionPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def full_state_dict(model, info: DistInfo, cpu: bool = True) -> dict:
    """Unsharded HF-named tensors (a collective under FSDP). With cpu=True only rank 0 receives them (offloaded to
    CPU, the other ranks get an empty dict); only checkpoints need this."""
    if not info.distributed:
        return {k: (v.detach().cpu() if cpu else v.detach()) for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu,
                                                                broadcast_from_rank0=False))


def _param_groups(module) -> list:
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)     # torch >= 2.9: a list; older: one group or None
    if groups is None:
        g = getattr(state, "_fsdp_param_group", None)
        groups = [g] if g is not None else []
    return list(groups)


@contextlib.contextmanager
def gathered(model):
    """Inside: every FSDP2 unit of `model` holds its unsharded parameters (in FSDP's param_dtype, bf16 on GPU), and
    forwards neither all-gather nor reshard. For generation and evaluation with the trainer's own sharded model:
    one all-gather per unit per call instead of one per decoding step, no per-step collectives (ranks may run
    different numbers of decoding steps), and no second, unsharded fp32 copy of the weights kept around.
    A no-op for a model that is not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    saved = []
    for m in units:
        saved.append(any(g.post_forward_mesh_info is not None for g in _param_groups(m)))
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m, reshard in zip(units, saved):
            m.set_reshard_after_forward(reshard, recurse=False)
            m.reshard()
