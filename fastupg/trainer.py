"""The HPT trainer, top to bottom (nanoGPT style). One optimizer step:

    1. take the next prompts (each rank its own slice of the global batch)
    2. sample `num_generations` rollouts per prompt through the rollout engine, score them with the verifier,
       add the demonstrations                                                   fastupg/rollout/collect.py
    3. advantages per branch; HPT routing per prompt: alpha = f(P) on its rollouts, beta = g(P) on its
       demonstration                                                            fastupg/routing.py
    4. drop zero-weight rows (before any forward pass); pack the rest into micro-batches under a token budget,
       each token with its aggregation weight (over the whole step, or per micro-batch: agg_scope)
                                                                                fastupg/data/packing.py, routing.py
    5. per micro-batch: per-token log-probs of the response tokens (never the N x V logits) -> fastupg.policy_loss
       with the precomputed weights, backward                                   fastupg/step_loss.py (models/hf_loss)
    6. clip, AdamW step, LR schedule; the engine gets the new weights           fastupg/optim.py, rollout/collect.py
    7. log; held-out eval; checkpoint                      fastupg/metrics.py, evaluate.py, checkpoint.py

What a run loads once (paths, data, model, verifier) is fastupg/loading.py; the picture: docs/architecture.md.
Run it with `python -m fastupg train --config configs/demo.yaml` (or under torchrun).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from pathlib import Path

import torch

from fastupg import checkpoint as ckpt
from fastupg import distributed as D
from fastupg.config import TrainConfig, fit_model_positions
from fastupg.data.packing import micro_batches
from fastupg.evaluate import example_levels, greedy_accuracy, greedy_eval  # noqa: F401
from fastupg.hpt import keep_rows
# the names below stay importable from fastupg.trainer (scripts, integrations and tests use them)
from fastupg.loading import (RunPaths, embedded_root, embedded_stage_cfg, load_data, load_model,  # noqa: F401
                             load_reference, prepare_model, resolve_paths, reward_fn)
from fastupg.metrics import RunLogger, plot_run, step_metrics
from fastupg.optim import clip_and_step, lr_lambda, make_optimizer
from fastupg.rollout.collect import Rows, collect_rows, make_vllm_engine, push_weights  # noqa: F401
from fastupg.routing import advantages, route_rows, token_weigher, token_weights  # noqa: F401
from fastupg.step_loss import StepLoss, token_logps  # noqa: F401


def train(cfg: TrainConfig, info: D.DistInfo | None = None, log=print) -> dict:
    """Run every stage of the recipe; returns the last stage's summary (paths, final metrics)."""
    info = info or D.init()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    stages = cfg.stage_configs()
    if len(stages) > 1:  # the stages' folders live under output_dir: check/clear it as a whole first
        ckpt.prepare_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite_output_dir, info)
    summary: dict = {}
    model_path = None
    for i, sc in enumerate(stages):
        if len(stages) > 1:
            sc = dataclasses.replace(sc, output_dir=str(Path(cfg.output_dir) / f"stage-{i}"),
                                     model=model_path or sc.model)
            if info.is_main:
                log(f"[fastupg] stage {i + 1}/{len(stages)}: loss_type={sc.loss_type} max_steps={sc.max_steps}")
        summary = Trainer(sc, info, log=log, embedded_base=cfg.model == "embedded").fit()
        model_path = summary.get("final_checkpoint")
    return summary


class Trainer:
    def __init__(self, cfg: TrainConfig, info: D.DistInfo, log=print, embedded_base: bool | None = None):
        cfg = fit_model_positions(cfg)  # prompt budget + completion must fit the model's positions: refuse now
        self.cfg, self.info = cfg, info
        self.log = log if info.is_main else (lambda *a, **k: None)
        self.est = cfg.estimator()
        # output_dir and resume first (cheap), so that a refused run has done no work
        ckpt.prepare_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite_output_dir, info)
        resume = ckpt.resolve_resume(cfg.resume, cfg.output_dir)
        for line in ckpt.check_resume(cfg, resume, lr_lambda):
            self.log(line)
        embedded = cfg.model == "embedded" if embedded_base is None else embedded_base
        base_cfg = cfg if cfg.model == "embedded" or not embedded else embedded_stage_cfg(cfg)
        self.paths = resolve_paths(base_cfg, info)
        start_from = self.paths.model if cfg.model == "embedded" or not embedded else cfg.model
        if cfg.resume is not False and resume is None:
            self.log(f"[fastupg] resume: no complete checkpoint in {cfg.output_dir} yet; starting fresh")
        self.resume_from = resume
        # seeds before any random init; each rank samples its own stream
        random.seed(cfg.seed + info.rank)
        torch.manual_seed(cfg.seed + info.rank)

        from transformers import AutoTokenizer
        dev = info.device
        self.tokenizer = AutoTokenizer.from_pretrained(str(resume or start_from))
        # data before the model: a data problem stops the run before any heavy work
        need_demo, need_answer = self.est.offline is not None, self.est.online is not None
        self.train_ex = load_data(self.paths.train_file, self.tokenizer, cfg, embedded, need_demo, need_answer, self.log)
        self.eval_ex = (load_data(self.paths.eval_file, self.tokenizer, cfg, embedded, False, log=self.log)
                        [:cfg.eval_samples] if self.paths.eval_file and cfg.eval_steps else [])
        self.eval_levels = example_levels(self.paths.eval_file, self.eval_ex)  # None: no difficulty column
        self.model = load_model(str(resume or start_from), cfg, dev)
        self.sharded = prepare_model(self.model, cfg, info, self.log)
        # rollouts and evaluation use the trainer's own model, sharded or not (under FSDP the HF engine gathers the
        # shards for the duration of a generate call: fastupg.distributed.gathered); no second copy of the weights
        self.gen_model = self.model
        from fastupg.rollout.hf import HFRolloutEngine
        self.engine = (make_vllm_engine(cfg, str(resume or start_from), info, self.tokenizer) if cfg.rollout_engine == "vllm"
                       else HFRolloutEngine(self.gen_model, self.tokenizer, device=dev))
        # vLLM samples with its own kernels: correct the mismatch (HF samples with this very model: ratio 1, skipped)
        self.use_is_correction = cfg.rollout_engine == "vllm" and cfg.vllm_importance_sampling_correction
        self.ref_model = load_reference(str(start_from), cfg, info, self.sharded) if cfg.beta > 0 else None
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if dev.type == "cuda" and cfg.torch_dtype == "auto" and not self.sharded else contextlib.nullcontext())
        self.loss = StepLoss(cfg, self.est, self.model, self.ref_model, autocast, self.sharded, info.world_size,
                             self.tokenizer.eos_token_id, dev)
        self.opt, self.sched = make_optimizer(self.model, cfg.optim, cfg.max_steps)
        self.score = reward_fn(self.paths.reward)

        self.step, self.data_pos, history = 0, 0, []
        if resume is not None:
            st = ckpt.load_training_state(resume, self.model, self.opt, self.sched, info)
            self.step, self.data_pos, history = st["step"], st["data_pos"], st.get("history", [])
            self.log(f"[fastupg] resumed from {resume} at step {self.step}")
        self.logger = RunLogger(cfg.output_dir, cfg.report_to, cfg.run_name, cfg.to_dict(), cfg.wandb_project,
                                enabled=info.is_main, console=self.log,
                                resume_step=self.step if resume is not None else None)
        self.logger.history = list(history)

    # -- one step -----------------------------------------------------------------------------------
    def next_prompts(self) -> list:
        """This rank's prompts for the next step: a seeded permutation per epoch, consumed in order
        (the position is saved in checkpoints, so a resumed run sees the same prompts)."""
        n, per = len(self.train_ex), self.cfg.prompts_per_step
        out = []
        for k in range(per * self.info.world_size):
            pos = self.data_pos + k
            epoch, i = divmod(pos, n)
            if i == 0 or not hasattr(self, "_perm") or self._perm[0] != epoch:
                g = torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)
                self._perm = (epoch, torch.randperm(n, generator=g).tolist())
            if k // per == self.info.rank:
                out.append(self.train_ex[self._perm[1][i]])
        self.data_pos += per * self.info.world_size
        return out

    def build_rows(self, prompts) -> tuple[Rows, dict]:
        """The step's rows (rollouts scored by the verifier, demonstrations) with advantages and HPT weights."""
        sampling = self.cfg.sampling if self.est.online is not None else None
        rows, gen_stats = collect_rows(self.engine, self.score, prompts, sampling, self.est.offline is not None,
                                       self.use_is_correction)
        rows, route_stats = route_rows(self.est, self.cfg, rows, len(prompts))
        return rows, {**gen_stats, **route_stats}

    def train_step(self) -> dict:
        cfg, info = self.cfg, self.info
        t0 = time.perf_counter()
        prompts = self.next_prompts()
        rows, stats = self.build_rows(prompts)
        kept = rows.select(keep_rows(rows.weight))        # zero-weight rows never reach a forward pass
        mbs = micro_batches(kept, cfg.max_tokens_per_microbatch, token_weigher(self.est, cfg, kept, info), info.device)
        n_passes = D.all_reduce_max(len(mbs), info)       # every rank runs as many passes (FSDP collectives)
        t_gen = time.perf_counter() - t0

        self.model.train()
        old = None                                        # one update per batch: pi_old = pi_theta exactly
        if cfg.num_iterations > 1 and self.est.online is not None and self.est.online.needs_old:
            _, old = self.loss.run(mbs, n_passes, None, grad=False)
        for _ in range(cfg.num_iterations):
            self.opt.zero_grad(set_to_none=True)
            acc, _ = self.loss.run(mbs, n_passes, old, grad=True)
            grad_norm = clip_and_step(self.model, self.opt, cfg.max_grad_norm)
        lr = self.sched.get_last_lr()[0]
        self.sched.step()
        push_weights(self.engine, self.model, cfg.rollout_engine)

        m = step_metrics(acc, rows, stats, est=self.est, cfg=cfg, info=info, n_prompts=len(prompts),
                         n_kept=len(kept.ids), grad_norm=grad_norm, lr=lr, dt=time.perf_counter() - t0, t_gen=t_gen,
                         use_is=self.use_is_correction, has_ref=self.ref_model is not None)
        if not math.isfinite(m["loss"]):
            raise FloatingPointError(f"non-finite loss {m['loss']} at step {self.step + 1}")
        return m

    # -- the loop -----------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """{"eval/accuracy": ..., "eval/accuracy/level<d>": ...} (per level when the eval rows have a difficulty)."""
        return greedy_eval(self.gen_model, self.tokenizer, self.eval_ex, self.score,
                           self.cfg.eval_max_new_tokens or self.cfg.max_completion_length,
                           self.cfg.eval_batch_size, self.info, self.eval_levels)

    def save(self) -> Path | None:
        state = {"step": self.step, "data_pos": self.data_pos, "history": self.logger.history,
                 "loss_type": self.cfg.loss_type, "config": self.cfg.to_dict()}
        return ckpt.save_checkpoint(self.cfg.output_dir, self.step, self.model, self.tokenizer, self.opt,
                                    self.sched, state, self.info, self.cfg.save_total_limit)

    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        bar = None
        if info.is_main and cfg.progress_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"{cfg.loss_type}", dynamic_ncols=True)
        last_saved = self.step if self.resume_from is not None else -1
        if cfg.eval_steps and self.step == 0 and self.eval_ex:
            ev = self.evaluate()
            self.logger.log(0, ev, print_console=False)
            self.log(f"[fastupg] held-out greedy accuracy before training: {ev['eval/accuracy']:.3f} "
                     f"({len(self.eval_ex)} prompts)")
        last: dict = {}
        try:
            while self.step < cfg.max_steps:
                m = self.train_step()
                self.step += 1
                if cfg.eval_steps and self.eval_ex and (self.step % cfg.eval_steps == 0 or self.step == cfg.max_steps):
                    m.update(self.evaluate())
                last = m
                if self.step % cfg.logging_steps == 0 or "eval/accuracy" in m or self.step == cfg.max_steps:
                    self.logger.log(self.step, m, print_console=bar is None)
                if bar is not None:
                    post = {k2: f"{m[k1]:.3f}" for k1, k2 in (("reward", "reward"), ("hpt/sft_fraction", "sft"),
                                                             ("eval/accuracy", "acc")) if k1 in m}
                    post["tok/s"] = f"{m['tokens_per_s']:.0f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < cfg.max_steps:
                    self.save()
                    last_saved = self.step
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            if self.step > last_saved and self.step > 0:
                self.log(f"\n[fastupg] interrupted: saving a checkpoint at step {self.step} ...")
                p = self.save()
                self.log(f"[fastupg] saved {p}; continue with resume=true")
            self._plot()
            raise
        if bar is not None:
            bar.close()
        final = self.save() if self.step > last_saved else ckpt.latest_checkpoint(cfg.output_dir)
        plot = self._plot()
        self.logger.close()
        if info.is_main:
            self.log(f"[fastupg] final checkpoint: {final}")
            if plot:
                self.log(f"[fastupg] plot: {plot}")
            self.log(f"[fastupg] metrics: {Path(cfg.output_dir) / 'metrics.jsonl'}")
            if self.paths.eval_file:  # what `fastupg eval --data` takes for this run's held-out split
                self.log(f"[fastupg] held-out data: {self.paths.eval_file}")
        return {"final_checkpoint": str(final) if final else str(ckpt.latest_checkpoint(cfg.output_dir)),
                "plot": str(plot) if plot else None, "metrics": last, "history": self.logger.history,
                "step": self.step}

    def _plot(self):
        if not (self.info.is_main and self.cfg.plot and self.logger.history):
            return None
        return plot_run(self.logger.history, Path(self.cfg.output_dir) / "run.png",
                        title=f"{self.cfg.loss_type} on {Path(self.paths.train_file).parent.parent.name or 'data'}")
