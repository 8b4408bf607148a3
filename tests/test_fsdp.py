"""FSDP2 on CPU: two gloo ranks, each with half the batch, give the same loss and the same updated
weights as one process with the whole batch (global token-mean normalisation makes this exact up to
float summation order)."""
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

EMB = str(Path(tempfile.gettempdir()) / "fastupg-test-emb")
pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed")


def _cfg(out, bs, **kw):
    from fastupg.config import TrainConfig
    base = dict(model="embedded", model_size="micro", embedded_dir=EMB, loss_type="sft", hpt_mode="switch",
                per_device_train_batch_size=bs, max_completion_length=32, max_steps=2,
                report_to=(), plot=False, progress_bar=False, save_steps=0, output_dir=str(out), seed=11,
                max_tokens_per_microbatch=64, adam_epsilon=0.1, learning_rate=0.1, max_grad_norm=0.0)
    base.update(kw)
    return TrainConfig(**base)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fastupg import distributed as D
    info = D.init("cpu")
    try:
        fn(info, *args)
    finally:
        D.shutdown()


def two_ranks(fn, *args):
    """Run fn(info, *args) on two gloo ranks (fn: a module-level function; rank 0 saves what the test reads)."""
    mp.spawn(_rank_main, args=(2, _free_port(), fn, args), nprocs=2, join=True)


def _worker(info, out, result):
    from fastupg import distributed as D
    from fastupg import trainer as T
    tr = T.Trainer(_cfg(out, 4), info)
    losses = [tr.train_step()["loss"] for _ in range(2)]
    sd = D.full_state_dict(tr.model, info)
    if info.rank == 0:
        torch.save({"losses": losses, "sd": sd}, result)


def test_two_rank_gloo_matches_single_process(tmp_path):
    from fastupg import distributed as D
    from fastupg import trainer as T
    paths = T.resolve_paths(_cfg(tmp_path, 8), D.DistInfo())   # build the embedded task once, before the ranks

    result = tmp_path / "fsdp.pt"
    two_ranks(_worker, str(tmp_path / "fsdp"), str(result))
    got = torch.load(result, weights_only=False)

    tr = T.Trainer(_cfg(tmp_path / "single", 8), D.DistInfo())
    losses = [tr.train_step()["loss"] for _ in range(2)]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    ref = {k: v.detach() for k, v in tr.model.state_dict().items()}
    assert set(ref) == set(got["sd"])
    init = T.load_model(paths.model, tr.cfg, torch.device("cpu")).state_dict()
    # adam_epsilon = 0.1 >> |g| makes the update ~ lr * m / eps, proportional to the gradient: a wrong scale
    # (e.g. FSDP's average over ranks left in) or a per-rank normalisation shows up in the weights
    moved = 0.0
    for k, v in ref.items():
        torch.testing.assert_close(got["sd"][k], v, rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")
        moved = max(moved, float((v - init[k]).abs().max()))
    assert moved > 1e-4, "nothing trained: the comparison would be vacuous"


# -- HPT with rollouts, two policy updates per batch (clipping), a reference model (KL), sharded ----------------------
class PerPromptEngine:
    """The trainer's own HF engine, one seeded generate call per prompt: the rollouts of a prompt depend on the
    prompt and the weights only, not on which rank or batch it lands in, so one process and two ranks see the same
    rollouts and their steps can be compared exactly."""

    def __init__(self, inner):
        self.inner = inner

    def generate(self, prompts, sampling):
        import dataclasses
        out = []
        for p in prompts:
            seed = sum((i + 1) * t for i, t in enumerate(p)) % 100_003
            out += self.inner.generate([p], dataclasses.replace(sampling, seed=seed))
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _parity(texts, golds):
    return [float(len(t) % 2) for t in texts]


def _hpt_cfg(out, bs, **kw):
    base = dict(loss_type="hpt", hpt_mode="switch", num_generations=2, num_iterations=2, beta=0.05,
                learning_rate=0.05)
    base.update(kw)
    return _cfg(out, bs, **base)


def _hpt_trainer(cfg, info):
    from fastupg import trainer as T
    tr = T.Trainer(cfg, info)
    tr.engine = PerPromptEngine(tr.engine)
    tr.score = _parity
    return tr


def _hpt_worker(info, out, result):
    from fastupg import distributed as D
    tr = _hpt_trainer(_hpt_cfg(out, 4), info)
    assert tr.sharded and type(tr.ref_model).__name__.startswith("FSDP")   # the reference is sharded too
    assert tr.gen_model is tr.model                                          # no second copy for generation
    ms = [tr.train_step() for _ in range(2)]
    sd = D.full_state_dict(tr.model, info)
    if info.rank == 0:
        torch.save({"metrics": ms, "sd": sd}, result)


def test_two_rank_hpt_rollouts_clipping_kl_matches_single_process(tmp_path):
    from fastupg import distributed as D
    from fastupg import trainer as T
    T.resolve_paths(_hpt_cfg(tmp_path, 8), D.DistInfo())
    result = tmp_path / "fsdp.pt"
    two_ranks(_hpt_worker, str(tmp_path / "fsdp"), str(result))
    got = torch.load(result, weights_only=False)

    tr = _hpt_trainer(_hpt_cfg(tmp_path / "single", 8), D.DistInfo())
    ms = [tr.train_step() for _ in range(2)]
    # the run exercises what it claims: RL and SFT rows, clipped tokens in the second update, a non-zero KL
    assert any(0 < m["hpt/sft_fraction"] < 1 for m in ms), [m["hpt/sft_fraction"] for m in ms]
    assert any(m["clip_ratio/low_mean"] + m["clip_ratio/high_mean"] > 0 for m in ms)
    assert ms[-1]["kl"] > 0
    for key in ("loss", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "reward"):
        torch.testing.assert_close(torch.tensor([m[key] for m in got["metrics"]]), torch.tensor([m[key] for m in ms]),
                                   rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
    ref = {k: v.detach() for k, v in tr.model.state_dict().items()}
    assert set(ref) == set(got["sd"])
    for k, v in ref.items():
        torch.testing.assert_close(got["sd"][k], v, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


# -- sharded optimizer state: save and resume exactly --------------------------------------------------------------
def _resume_worker(info, out, result):
    from fastupg import distributed as D
    from fastupg import trainer as T
    kw = dict(loss_type="grpo", num_generations=2, max_completion_length=12, learning_rate=0.01, max_grad_norm=1.0,
              adam_epsilon=1e-8, report_to=("jsonl",))
    T.Trainer(_cfg(Path(out) / "full", 4, max_steps=3, **kw), info).fit()
    T.Trainer(_cfg(Path(out) / "split", 4, max_steps=2, **kw), info).fit()          # saves checkpoint-2
    opt_dir = Path(out) / "split" / "checkpoint-2" / "optimizer"
    tr = T.Trainer(_cfg(Path(out) / "split", 4, max_steps=3, resume=True, **kw), info)
    tr.fit()
    full = T.Trainer(_cfg(Path(out) / "full", 4, max_steps=3, resume=True, **kw), info)  # loads checkpoint-3
    a = D.full_state_dict(full.model, info)
    b = D.full_state_dict(tr.model, info)
    if info.rank == 0:
        torch.save({"a": a, "b": b, "opt_files": sorted(p.name for p in opt_dir.iterdir()),
                    "losses": [r["loss"] for r in tr.logger.history],
                    "full_losses": [r["loss"] for r in full.logger.history]}, result)


def test_two_rank_sharded_optimizer_resume_is_exact(tmp_path):
    from fastupg import distributed as D
    from fastupg import trainer as T
    T.resolve_paths(_cfg(tmp_path, 8), D.DistInfo())
    result = tmp_path / "resume.pt"
    two_ranks(_resume_worker, str(tmp_path), str(result))
    got = torch.load(result, weights_only=False)
    assert any(f.endswith(".distcp") for f in got["opt_files"]), got["opt_files"]   # per-rank shard files
    assert got["losses"] == got["full_losses"]
    for k, v in got["a"].items():
        torch.testing.assert_close(got["b"][k], v, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


# -- agg_scope=microbatch (hpt-official): each rank's per-micro-batch losses, averaged over ranks -----------------------
def _official_cfg(out, bs):
    from fastupg.config import load_config
    root = Path(__file__).resolve().parents[1]
    return load_config(root / "configs" / "hpt-official.yaml", model_size="micro", embedded_dir=EMB, embedded_mix=(),
                       embedded_n_train=0, num_generations=2, per_device_train_batch_size=bs, max_completion_length=32,
                       max_tokens_per_microbatch=64, report_to=(), plot=False, progress_bar=False, save_steps=0,
                       eval_steps=0, seed=11, output_dir=str(out))


def _step_grad(tr):
    """The gradient one step's loss passes leave (full tensors, by parameter name), before any optimizer step."""
    from fastupg import distributed as D
    from fastupg import trainer as T
    rows, _ = tr.build_rows(tr.next_prompts())
    kept = rows.select(T.keep_rows(rows.weight))
    mbs = T.micro_batches(kept, tr.cfg.max_tokens_per_microbatch, T.token_weigher(tr.est, tr.cfg, kept, tr.info))
    tr.model.zero_grad(set_to_none=True)
    tr.loss.run(mbs, D.all_reduce_max(len(mbs), tr.info), None, grad=True)
    full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g  # noqa: E731  (FSDP2: DTensor shards)
    return {n: full(p.grad).detach().clone() for n, p in tr.model.named_parameters()}, len(mbs)


def _official_worker(info, out, result):
    tr = _hpt_trainer(_official_cfg(out, 4), info)
    assert tr.cfg.agg_scope == "microbatch" and tr.sharded
    g, n = _step_grad(tr)
    if info.rank == 0:
        torch.save({"grad": g, "n_mbs": n}, result)


def test_two_rank_hpt_official_averages_the_ranks_per_micro_batch_losses(tmp_path):
    """Under agg_scope=microbatch a rank's gradient depends on its rows alone (its micro-batches are its own), and
    the ranks' gradients are AVERAGED (verl/FSDP): two ranks == the mean of one process running rank 0's prompts,
    then rank 1's (the same prompts, rollouts and micro-batches)."""
    from fastupg import distributed as D
    from fastupg import trainer as T
    T.resolve_paths(_official_cfg(tmp_path, 4), D.DistInfo())
    result = tmp_path / "official.pt"
    two_ranks(_official_worker, str(tmp_path / "fsdp"), str(result))
    got = torch.load(result, weights_only=False)

    tr = _hpt_trainer(_official_cfg(tmp_path / "single", 4), D.DistInfo())
    g0, n0 = _step_grad(tr)          # positions 0..1 of the permutation: rank 0's prompts
    g1, _ = _step_grad(tr)           # positions 2..3: rank 1's
    assert got["n_mbs"] == n0 >= 2
    for k, v in got["grad"].items():
        torch.testing.assert_close(v, (g0[k] + g1[k]) / 2, rtol=1e-4, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert not all(torch.allclose(g0[k] + g1[k], got["grad"][k], rtol=1e-3) for k in g0), "vacuous: a sum, not a mean"
