"""Crash-safe checkpoints: Hugging Face weights + everything needed to continue exactly.

Layout of `output_dir/checkpoint-{step}/`:

    config.json, model.safetensors, tokenizer files   save_pretrained: loads with from_pretrained
    trainer_state.pt      LR scheduler, step, stage, data position, metric history (+ the optimizer, one process)
    optimizer/            FSDP: the optimizer state as each rank's shards (torch.distributed.checkpoint); no
                          rank ever holds the whole Adam state, on save or on resume
    rng-{rank}.pt         python / torch (CPU + CUDA) RNG states of every rank
    trainer_state.json    human-readable summary (step, stage, time)
    COMPLETE              written last: a directory without it is never resumed from

Atomicity: everything is written into `output_dir/.tmp-checkpoint-{step}`, every file and the
directory are fsync'ed, COMPLETE is written, and only then the directory is renamed into place
(`os.rename` is atomic on POSIX). A run killed mid-save leaves at most a `.tmp-*` directory,
which `latest_checkpoint` ignores and the next save removes. A run killed mid-step loses at most
one `save_steps` interval.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch

from fastupg import distributed as D

_NAME = re.compile(r"^checkpoint-(\d+)$")
MARKER = "COMPLETE"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rng_state() -> dict:
    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        st["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if "numpy" in st:
        import numpy as np
        np.random.set_state(st["numpy"])


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in output_dir, oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    cps = list_checkpoints(output_dir)
    return cps[-1][1] if cps else None


def resolve_resume(resume, output_dir) -> Path | None:
    """`resume=True`: latest complete checkpoint in output_dir (None when there is none yet);
    a path: that checkpoint, which must be complete."""
    if resume is False or resume is None:
        return None
    if resume is True:
        return latest_checkpoint(output_dir)
    p = Path(resume)
    if not (p / MARKER).is_file():
        raise ValueError(f"resume={str(resume)!r} is not a complete checkpoint (no {MARKER} file)")
    return p


def save_checkpoint(output_dir, step: int, model, tokenizer, optimizer, scheduler, state: dict,
                    info: D.DistInfo, save_total_limit: int | None = None) -> Path | None:
    """Collective (every rank calls it). Returns the final path on rank 0, None elsewhere."""
    root = Path(output_dir)
    tmp = root / f".tmp-checkpoint-{step}"
    final = root / f"checkpoint-{step}"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    D.barrier(info)
    # collective parts first (every rank participates), then rank 0 writes
    sd = D.full_state_dict(model, info)          # HF weights for save_pretrained: only rank 0 receives them
    optim_sd = _optimizer_state(model, optimizer, info)
    if info.distributed:                          # every rank writes its own shards
        import torch.distributed.checkpoint as dcp
        dcp.save({"optimizer": optim_sd}, checkpoint_id=str(tmp / "optimizer"))
        optim_sd = None
    torch.save(rng_state(), tmp / f"rng-{info.rank}.pt")
    D.barrier(info)
    if info.is_main:
        unwrapped = model
        unwrapped.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        torch.save({"optimizer": optim_sd, "optimizer_format": "dcp" if info.distributed else "torch",
                    "scheduler": scheduler.state_dict(), "state": state,
                    "world_size": info.world_size}, tmp / "trainer_state.pt")
        summary = {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool))}
        (tmp / "trainer_state.json").write_text(json.dumps({**summary, "time": time.time()}, indent=2))
        _fsync_tree(tmp)
        (tmp / MARKER).write_text("ok\n")
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): replace the old one atomically enough
            trash = root / f".old-checkpoint-{step}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if save_total_limit:
            for _, old in list_checkpoints(root)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    D.barrier(info)
    return final if info.is_main else None


def _optimizer_state(model, optimizer, info: D.DistInfo) -> dict:
    """One process: optimizer.state_dict(). FSDP: this rank's shards, keyed by parameter names (DTensors)."""
    if not info.distributed:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer)


def load_training_state(path, model, optimizer, scheduler, info: D.DistInfo) -> dict:
    """Restore optimizer, scheduler and this rank's RNG from a checkpoint (the weights were already
    loaded with from_pretrained). Returns the saved trainer `state` dict."""
    path = Path(path)
    blob = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    if blob["world_size"] != info.world_size:
        raise ValueError(f"checkpoint {path} was written by {blob['world_size']} ranks, this run has "
                         f"{info.world_size}: the data position and RNG streams would not continue exactly")
    if info.distributed:
        if blob.get("optimizer_format") != "dcp":
            raise ValueError(f"checkpoint {path} has no sharded optimizer state (written by an older fastupg)")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        osd = _optimizer_state(model, optimizer, info)   # this rank's layout (initialises empty Adam state)
        box = {"optimizer": osd}
        dcp.load(box, checkpoint_id=str(path / "optimizer"))  # reads only this rank's shards
        set_optimizer_state_dict(model, optimizer, box["optimizer"])
    else:
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(torch.load(path / f"rng-{info.rank}.pt", weights_only=False))
    return blob["state"]
