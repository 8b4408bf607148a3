"""The HPT trainer, top to bottom (nanoGPT style). One optimizer step:

    1. take the next prompts (each rank its own slice of the global batch)
    2. sample `num_generations` rollouts per prompt through the rollout protocol (HF generate by default)
    3. score them with the verifier (0/1)
    4. advantages (grpo / Dr.GRPO / mixed with the demonstration in the group / reinforce / rloo / A = 1)
    5. HPT routing per prompt: alpha = f(P) on its rollouts, beta = g(P) on its demonstration
    6. drop zero-weight rows (before any forward pass), compute the aggregation weight of every
       remaining token over the WHOLE global batch, pack rows into micro-batches under a token budget
    7. per micro-batch: per-token log-probs of the response tokens (models/hf_loss: decoder body + fused-linear
       log-softmax, never the N x V logits; the same path sharded or not) -> fastupg.policy_loss with
       agg='token-sum' and the precomputed weights, backward; the sum over micro-batches and ranks is
       exactly the loss of one big batch
    8. clip, AdamW step, LR schedule; log; held-out eval; checkpoint

Everything that is not the loop (config, packing, FSDP, checkpoints, logging) lives in its own module.
Run it with `python -m fastupg train --config configs/demo.yaml` (or under torchrun).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastupg import advantages as adv_lib
from fastupg import checkpoint as ckpt
from fastupg import distributed as D
from fastupg.config import TrainConfig
from fastupg.data.packing import PackedBatch, pack, row_length
from fastupg.estimator import aggregation_weights, policy_loss
from fastupg.hpt import HPTConfig, keep_rows, route
from fastupg.metrics import RunLogger, plot_run
from fastupg.rollout.base import SamplingConfig
from fastupg.rollout.correction import is_correction, is_correction_stats


# ----------------------------------------------------------------------------------------------
# setup helpers
# ----------------------------------------------------------------------------------------------
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


def lr_lambda(cfg: TrainConfig):
    warm = max(cfg.warmup_steps, math.ceil(cfg.warmup_ratio * cfg.max_steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.lr_scheduler_type == "constant":
            return 1.0
        prog = min(1.0, (step - warm) / max(1, cfg.max_steps - warm))
        shape = 0.5 * (1 + math.cos(math.pi * prog)) if cfg.lr_scheduler_type == "cosine" else 1 - prog
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape
    return f


# ----------------------------------------------------------------------------------------------
# the loss: ONE place computes per-token log-probs, sharded or not (fastupg/models/hf_loss.py)
# ----------------------------------------------------------------------------------------------
def loss_impl(cfg: TrainConfig) -> str:
    """fused-linear impl of the trainer's log-probs: "chunked" (never more than one chunk of logits, on every
    device), or the plain "torch" reference (N x V logits) when use_fused_loss is off."""
    return "chunked" if cfg.use_fused_loss else "torch"


def token_logps(model, mb: PackedBatch, temperature: float, impl: str = "chunked", chunk_bytes: int = 2 ** 30):
    """(logp, entropy) of the response tokens of a packed micro-batch, differentiable, float32.

    The decoder body gives hidden states; only the response positions (mb.loss_mask) go through the lm_head, by
    the fused-linear log-softmax: prompt tokens never reach the head and the N x V logits never exist. The same
    call serves an FSDP2-sharded model (hf_loss runs it inside the root's forward hooks).
    """
    from fastupg.models.hf_loss import causal_lm_logprobs
    logp, ent = causal_lm_logprobs(model, mb.input_ids, mb.targets[None], position_ids=mb.position_ids,
                                   temperature=temperature, return_entropy=True, impl=impl,
                                   select=mb.loss_mask[None], chunk_bytes=chunk_bytes)
    return logp.float(), ent.float()


# ----------------------------------------------------------------------------------------------
# rows of one step
# ----------------------------------------------------------------------------------------------
@dataclass
class Rows:
    ids: list            # token ids per row (prompt + response)
    start: list          # index of the first response token
    offline: torch.Tensor    # bool per row: demonstration
    group: torch.Tensor      # local prompt index per row
    reward: torch.Tensor
    adv: torch.Tensor
    weight: torch.Tensor     # HPT alpha / beta (1 outside HPT)
    # per row: the rollout engine's log-probs of its response tokens (vLLM), None for demonstrations;
    # None for the whole batch when no importance-sampling correction applies (HF engine)
    sampler_logp: list | None = None

    def select(self, idx: torch.Tensor) -> "Rows":
        ii = idx.tolist()
        slp = None if self.sampler_logp is None else [self.sampler_logp[i] for i in ii]
        return Rows([self.ids[i] for i in ii], [self.start[i] for i in ii], self.offline[idx], self.group[idx],
                     self.reward[idx], self.adv[idx], self.weight[idx], slp)


def advantages(est, reward, group, offline) -> torch.Tensor:
    """Per-row advantage from each branch's `advantage` choice (docs/math.md §1.2)."""
    A = torch.ones_like(reward)
    on = ~offline
    std = est.adv_std
    if est.online is not None and bool(on.any()):
        kind = est.online.advantage
        if kind == "grpo":
            A[on] = adv_lib.grpo(reward[on], group[on], std=std)
        elif kind == "mixed":
            A[on] = adv_lib.mixed(reward, group, std=std)[on]
        elif kind == "reinforce":
            A[on] = adv_lib.reinforce(reward[on])
        elif kind == "rloo":
            A[on] = adv_lib.rloo(reward[on], group[on])
        elif kind != "one":
            raise ValueError(f"advantage {kind!r} is not supported by the trainer (needs a value model)")
    if est.offline is not None and bool(offline.any()):
        kind = est.offline.advantage
        if kind == "mixed":
            A[offline] = adv_lib.mixed(reward, group, std=std)[offline]
        elif kind == "grpo":
            A[offline] = adv_lib.grpo(reward, group, std=std, stats_mask=on)[offline]
        elif kind == "reinforce":
            A[offline] = adv_lib.reinforce(reward[offline])
        elif kind != "one":
            raise ValueError(f"offline advantage {kind!r} is not supported by the trainer")
    return A


def hpt_weights(cfg: TrainConfig, reward, group, offline, n_prompts: int):
    """(row weights, per-prompt P, per-prompt beta): HPT's alpha on rollouts and beta on the demonstration."""
    on = ~offline
    P = torch.zeros(n_prompts, dtype=reward.dtype).index_add_(0, group[on], reward[on])
    P = P / torch.zeros(n_prompts, dtype=reward.dtype).index_add_(0, group[on], torch.ones_like(reward[on])).clamp_min(1)
    if cfg.loss_type != "hpt":
        return torch.ones_like(reward), P, torch.full_like(P, float("nan"))
    alpha, beta = route(P, HPTConfig(mode=cfg.hpt_mode, gate=cfg.hpt_gate, soft=cfg.hpt_soft))
    w = torch.where(offline, beta[group], alpha[group])
    return w, P, beta


def token_weights(est, cfg: TrainConfig, rows: Rows, info: D.DistInfo) -> list[torch.Tensor]:
    """Aggregation weight s_t * HPT weight of every response token of every local row, with s_t computed
    over the GLOBAL batch (all ranks' kept rows), so that summing token-sum losses over micro-batches and
    ranks reproduces the estimator's aggregation of one big batch exactly."""
    mine = [(len(r) - s, bool(o)) for r, s, o in zip(rows.ids, rows.start, rows.offline.tolist())]
    everyone = D.all_gather_object(mine, info)
    lens = [n for part in everyone for n, _ in part]
    offs = [o for part in everyone for _, o in part]
    if not lens:
        return []
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    off = torch.repeat_interleave(torch.tensor(offs), torch.tensor(lens))
    s = aggregation_weights(est, torch.ones(len(seq)), off, seq, padded_len=cfg.max_completion_length)
    first = sum(len(p) for p in everyone[:info.rank])
    bounds = torch.tensor([0] + lens).cumsum(0)
    out = []
    for j in range(len(mine)):
        g = first + j
        out.append(s[bounds[g]:bounds[g + 1]] * float(rows.weight[j]))
    return out


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_accuracy(model, tokenizer, examples, score, max_new_tokens: int, batch_size: int,
                    info: D.DistInfo) -> float:
    """Held-out accuracy with greedy decoding; each rank scores its slice, summed over ranks."""
    from fastupg.evaluate import greedy_eval
    return greedy_eval(model, tokenizer, examples, score, max_new_tokens, batch_size, info)["eval/accuracy"]


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
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
            import dataclasses
            sc = dataclasses.replace(sc, output_dir=str(Path(cfg.output_dir) / f"stage-{i}"),
                                     model=model_path or sc.model)
            if info.is_main:
                log(f"[fastupg] stage {i + 1}/{len(stages)}: loss_type={sc.loss_type} max_steps={sc.max_steps}")
        summary = Trainer(sc, info, log=log, embedded_base=cfg.model == "embedded").fit()
        model_path = summary.get("final_checkpoint")
    return summary


def make_vllm_engine(cfg: TrainConfig, model_path: str, info: D.DistInfo, tokenizer=None):
    """One vllm.LLM per rank (external_launcher under torchrun), started from the same checkpoint as the trainer."""
    from fastupg.rollout.vllm import VLLMConfig, VLLMRolloutEngine
    # seed: the run's; the engine gives each tensor-parallel group one (its ranks must sample alike).
    # The platform picks the rest (on CPU: in-process, float32, no sleep mode).
    vcfg = VLLMConfig(model=model_path, tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                      gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                      max_model_len=cfg.max_prompt_length + cfg.max_completion_length,
                      enable_sleep_mode=cfg.vllm_enable_sleep_mode, colocate=info.distributed,
                      seed=cfg.seed, extra=_vllm_context_overrides(cfg))
    return VLLMRolloutEngine(vcfg, tokenizer)


def _vllm_context_overrides(cfg: TrainConfig) -> tuple:
    """vLLM gets the recipe's context overrides as the trainer does (else it refuses a max_model_len beyond the
    checkpoint's positions): `hf_overrides` as a picklable callable on the config it loads."""
    if cfg.rope_theta is None and cfg.max_position_embeddings is None:
        return ()
    import functools
    from fastupg.models.context import apply_context_overrides
    return (("hf_overrides", functools.partial(apply_context_overrides, rope_theta=cfg.rope_theta,
                                               max_position_embeddings=cfg.max_position_embeddings)),)


class Trainer:
    def __init__(self, cfg: TrainConfig, info: D.DistInfo, log=print, embedded_base: bool | None = None):
        from fastupg.config import fit_model_positions
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
        base_cfg = cfg if cfg.model == "embedded" or not embedded else _embedded_cfg(cfg)
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
        self.model = load_model(str(resume or start_from), cfg, dev)
        self.liger = apply_liger(self.model, cfg, dev, self.log)
        self.sharded = info.distributed and cfg.fsdp
        if cfg.gradient_checkpointing:
            if self.sharded:
                D.apply_activation_checkpointing(self.model)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # rollouts and evaluation use the trainer's own model, sharded or not (under FSDP the HF engine gathers the
        # shards for the duration of a generate call: fastupg.distributed.gathered); no second copy of the weights
        from fastupg.rollout.hf import HFRolloutEngine
        if self.sharded:
            D.shard_model(self.model, info, mixed_precision=dev.type == "cuda" and cfg.torch_dtype == "auto")
        elif info.distributed:
            raise ValueError("fsdp=false with more than one rank is not supported (use fsdp=true)")
        self.gen_model = self.model
        self.engine = (make_vllm_engine(cfg, str(resume or start_from), info, self.tokenizer) if cfg.rollout_engine == "vllm"
                       else HFRolloutEngine(self.gen_model, self.tokenizer, device=dev))
        # vLLM samples with its own kernels: correct the mismatch (HF samples with this very model: ratio 1, skipped)
        self.use_is_correction = cfg.rollout_engine == "vllm" and cfg.vllm_importance_sampling_correction
        self.ref_model = None
        if cfg.beta > 0:  # frozen; sharded like the policy, so each rank holds 1/world of it
            self.ref_model = load_model(str(start_from), cfg, dev).eval().requires_grad_(False)
            if self.sharded:
                D.shard_model(self.ref_model, info, mixed_precision=dev.type == "cuda" and cfg.torch_dtype == "auto")
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if dev.type == "cuda" and cfg.torch_dtype == "auto" and not self.sharded
                         else contextlib.nullcontext())

        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                     eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))

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

    # -- data ---------------------------------------------------------------------------------------
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

    # -- one step -----------------------------------------------------------------------------------
    def build_rows(self, prompts) -> tuple[Rows, dict]:
        cfg, est = self.cfg, self.est
        ids, start, off, grp, rew, gen_stats = [], [], [], [], [], {}
        slp = [] if self.use_is_correction else None
        if est.online is not None:
            sampling = SamplingConfig(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                                      top_k=cfg.top_k, max_new_tokens=cfg.max_completion_length)
            groups = self.engine.generate([e.prompt_ids for e in prompts], sampling)
            self.engine.sleep()     # vLLM sleep mode: free the KV cache for the training step (HF: no-op)
            lens, trunc = [], []
            for g, (e, rolls) in enumerate(zip(prompts, groups)):
                scores = self.score([r.text for r in rolls], [e.answer] * len(rolls))
                for r, s in zip(rolls, scores):
                    if not r.completion_ids:
                        continue
                    ids.append(list(e.prompt_ids) + list(r.completion_ids))
                    start.append(len(e.prompt_ids))
                    off.append(False), grp.append(g), rew.append(float(s))
                    if slp is not None:
                        if r.logprobs is None or len(r.logprobs) != len(r.completion_ids):
                            raise RuntimeError("vllm_importance_sampling_correction needs the engine's log-probs "
                                               "of every sampled token")
                        slp.append(r.logprobs)
                    lens.append(len(r.completion_ids)), trunc.append(float(r.truncated))
            gen_stats = {"len_sum": float(sum(lens)), "trunc_sum": float(sum(trunc)), "n_gen": float(len(lens))}
        if est.offline is not None:
            for g, e in enumerate(prompts):
                ids.append(list(e.prompt_ids) + list(e.demo_ids))
                start.append(len(e.prompt_ids))
                off.append(True), grp.append(g), rew.append(1.0)  # the demonstration is a correct solution
                if slp is not None:
                    slp.append(None)
        offline = torch.tensor(off, dtype=torch.bool)
        group = torch.tensor(grp, dtype=torch.long)
        reward = torch.tensor(rew, dtype=torch.float32)
        A = advantages(est, reward, group, offline)
        weight, P, beta = hpt_weights(cfg, reward, group, offline, len(prompts))
        rows = Rows(ids, start, offline, group, reward, A, weight, slp)
        return rows, {**gen_stats, "P": P, "beta": beta}

    def micro_batches(self, rows: Rows, tok_w: list[torch.Tensor]):
        dev = self.info.device
        # a row longer than the budget (long prompt + long response) gets a micro-batch of its own
        budget = max([self.cfg.max_tokens_per_microbatch] + [row_length(r) for r in rows.ids])
        mbs = pack(rows.ids, rows.start, budget, device=dev) if rows.ids else []
        # every rank must run the same number of forward/backward passes (FSDP collectives)
        n = D.all_reduce_max(len(mbs), self.info)
        out = []
        for mb in mbs:
            ri = mb.row_index[mb.loss_mask].cpu()
            w = torch.cat([tok_w[i] for i in mb.rows]).to(dev)
            x = dict(adv=rows.adv[ri].to(dev), offline=rows.offline[ri].to(dev), weight=w,
                     seq_ids=mb.row_index[mb.loss_mask])
            if rows.sampler_logp is not None:   # demonstrations: NaN, outside the correction's mask
                x["sampler_logp"] = torch.cat([
                    torch.tensor(rows.sampler_logp[i], dtype=torch.float32) if rows.sampler_logp[i] is not None
                    else torch.full((len(tok_w[i]),), float("nan")) for i in mb.rows]).to(dev)
            out.append((mb, x))
        return out + [None] * (n - len(mbs))

    def _logps(self, model, mb: PackedBatch):
        return token_logps(model, mb, self.cfg.temperature, loss_impl(self.cfg), self.cfg.loss_chunk_mb * 2 ** 20)

    def _dummy_pass(self, grad: bool):
        """A rank with fewer micro-batches still joins the collectives (FSDP all-gathers of the policy and the
        reference model, the gradient reduce-scatter) in the same order as a real pass: a zero-gradient pass."""
        from fastupg.data.packing import collate
        eos = int(self.tokenizer.eos_token_id)
        mb = collate([[eos, eos]], [1], [0], device=self.info.device)
        with (contextlib.nullcontext() if grad else torch.no_grad()), self.autocast:
            logp, _ = self._logps(self.model, mb)
        if grad and self.ref_model is not None:
            with torch.no_grad(), self.autocast:
                self._logps(self.ref_model, mb)
        if grad:
            (logp.sum() * 0.0).backward()

    def loss_pass(self, mbs, old: list | None, grad: bool):
        """Forward (+ backward) over all micro-batches; returns (summed metrics, per-mb logp)."""
        acc: dict[str, float] = {}
        logps = []
        for k, item in enumerate(mbs):
            if item is None:
                self._dummy_pass(grad)
                logps.append(None)
                continue
            mb, x = item
            ctx = contextlib.nullcontext() if grad else torch.no_grad()
            with ctx, self.autocast:
                logp, ent = self._logps(self.model, mb)
            logps.append(logp.detach())
            if not grad:
                continue
            ref = None
            if self.ref_model is not None:
                with torch.no_grad(), self.autocast:
                    ref = self._logps(self.ref_model, mb)[0]
            o = old[k] if old is not None else logp.detach()  # one update per batch: pi_old = pi_theta exactly
            weight = x["weight"].to(logp.dtype)
            if "sampler_logp" in x:
                weight = weight * self.importance_weights(o, x, acc)
            loss, m = policy_loss(logp, self.est, advantages=x["adv"], old_logp=o, offline=x["offline"],
                                  seq_ids=x["seq_ids"], weight=weight, entropy=ent,
                                  ref_logp=ref, agg="token-sum")
            # the weights already normalise over the global batch; FSDP averages over ranks, so undo its 1/world
            (loss * self.info.world_size if self.sharded else loss).backward()
            n_on = float(m["tokens/online"])
            ntok = float(mb.loss_mask.sum())
            for key, v in (("loss", float(loss.detach())), ("clip_low", float(m["clip_ratio/low"]) * n_on),
                           ("clip_high", float(m["clip_ratio/high"]) * n_on), ("n_on", n_on),
                           ("ent", float(m["entropy"]) * ntok), ("kl", float(m["kl"]) * ntok), ("ntok", ntok),
                           ("packed", float(mb.num_tokens))):
                acc[key] = acc.get(key, 0.0) + v
        return acc, logps

    def importance_weights(self, old_logp: torch.Tensor, x: dict, acc: dict) -> torch.Tensor:
        """Truncated IS weight per token (fastupg.rollout.correction): pi_old (the trainer's log-probs
        before this update, as TRL's old_per_token_logps) over the engine's; 1 on demonstrations."""
        cfg = self.cfg
        on = ~x["offline"]
        args = dict(seq_ids=x["seq_ids"], mode=cfg.vllm_importance_sampling_mode,
                    cap=cfg.vllm_importance_sampling_clip_max)
        w = is_correction(old_logp, x["sampler_logp"], on, **args)
        for key, v in is_correction_stats(old_logp, x["sampler_logp"], on, **args).items():
            if key != "logp_diff_max":
                acc["is_" + key] = acc.get("is_" + key, 0.0) + v
        return torch.where(on, w.to(old_logp.dtype), torch.ones_like(old_logp))

    def push_weights(self) -> None:
        """After an update: the rollout engine gets the new weights. vLLM: in place, in vLLM's staged
        order (wake the weights, load them, then wake the KV cache; no-ops without sleep mode), one
        parameter gathered at a time (a collective: every rank runs it in step)."""
        if self.cfg.rollout_engine == "vllm":
            from fastupg.rollout.vllm import iter_full_state
            self.engine.wake_up(tags=["weights"])
            self.engine.sync_weights(iter_full_state(self.model))
            self.engine.wake_up(tags=["kv_cache"])
        # the HF engine generates with self.model itself (sharded or not): nothing to sync, no full state dict

    def train_step(self) -> dict:
        cfg, info = self.cfg, self.info
        t0 = time.perf_counter()
        prompts = self.next_prompts()
        rows, gstats = self.build_rows(prompts)
        n_rows = len(rows.ids)
        keep = keep_rows(rows.weight)
        kept = rows.select(keep)                          # zero-weight rows never reach a forward pass
        tok_w = token_weights(self.est, cfg, kept, info)
        mbs = self.micro_batches(kept, tok_w)
        t_gen = time.perf_counter() - t0

        self.model.train()
        old = None
        if cfg.num_iterations > 1 and self.est.online is not None and self.est.online.needs_old:
            _, old = self.loss_pass(mbs, None, grad=False)
        acc: dict = {}
        for _ in range(cfg.num_iterations):
            self.opt.zero_grad(set_to_none=True)
            acc, _ = self.loss_pass(mbs, old, grad=True)
            if cfg.max_grad_norm > 0:
                gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            else:
                gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
            self.opt.step()
        lr = self.sched.get_last_lr()[0]
        self.sched.step()
        self.push_weights()
        dt = time.perf_counter() - t0

        # -- metrics, reduced over ranks ------------------------------------------------------------
        on = ~rows.offline
        r_on = rows.reward[on]
        grp_std = _group_std(r_on, rows.group[on])
        P, beta = gstats["P"], gstats["beta"]
        vals = {
            "loss": acc.get("loss", 0.0), "reward_sum": float(r_on.sum()), "n_on_rows": float(on.sum()),
            "reward_std_sum": float(grp_std.sum()), "n_groups": float(len(grp_std)),
            "clip_low": acc.get("clip_low", 0.0), "clip_high": acc.get("clip_high", 0.0), "n_on": acc.get("n_on", 0.0),
            "ent": acc.get("ent", 0.0), "kl": acc.get("kl", 0.0), "ntok": acc.get("ntok", 0.0),
            "packed": acc.get("packed", 0.0), "len_sum": gstats.get("len_sum", 0.0),
            "trunc_sum": gstats.get("trunc_sum", 0.0), "n_gen": gstats.get("n_gen", 0.0),
            "sft_prompts": float((beta > 0).sum()) if self.est.offline is not None and cfg.loss_type == "hpt" else 0.0,
            "n_prompts": float(len(prompts)), "rows": float(n_rows), "kept": float(len(keep)),
            "P_solved": float((P > 0).sum()) if self.est.online is not None else 0.0,
            **{k: acc.get(k, 0.0) for k in ("is_ratio_sum", "is_clipped", "is_tokens", "is_logp_diff_sum")},
        }
        names = list(vals)
        tot = D.all_reduce_sum(torch.tensor([vals[k] for k in names], dtype=torch.float64), info)
        v = dict(zip(names, tot.tolist()))
        d = lambda a, b: v[a] / v[b] if v[b] else 0.0  # noqa: E731
        m = {"loss": v["loss"], "grad_norm": float(gn), "learning_rate": lr,
             "tokens/trained": v["packed"], "tokens_per_s": (v["packed"] + v["len_sum"]) / max(dt, 1e-9),
             "time/step_s": dt, "time/rollout_s": t_gen, "rows/kept_fraction": d("kept", "rows")}
        if self.est.online is not None:
            m.update({"reward": d("reward_sum", "n_on_rows"), "reward_std": d("reward_std_sum", "n_groups"),
                      "completions/mean_length": d("len_sum", "n_gen"),
                      "completions/clipped_ratio": d("trunc_sum", "n_gen"),
                      "clip_ratio/low_mean": d("clip_low", "n_on"), "clip_ratio/high_mean": d("clip_high", "n_on"),
                      "frac_prompts_solved": d("P_solved", "n_prompts")})
        if self.use_is_correction and v["is_tokens"]:  # TRL's names; means over the trained rollout tokens
            m.update({"sampling/importance_sampling_ratio/mean": d("is_ratio_sum", "is_tokens"),
                      "sampling/importance_sampling_ratio/clipped_fraction": d("is_clipped", "is_tokens"),
                      "sampling/sampling_logp_difference/mean": d("is_logp_diff_sum", "is_tokens")})
        if cfg.loss_type == "hpt":
            m["hpt/sft_fraction"] = d("sft_prompts", "n_prompts")
        m["entropy"] = d("ent", "ntok")
        if self.ref_model is not None:
            m["kl"] = d("kl", "ntok")
        if not math.isfinite(m["loss"]):
            raise FloatingPointError(f"non-finite loss {m['loss']} at step {self.step + 1}")
        return m

    # -- the loop -----------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """{"eval/accuracy": ..., "eval/accuracy/level<d>": ...} (per level when the eval rows have a difficulty)."""
        from fastupg.evaluate import example_levels, greedy_eval
        if not hasattr(self, "eval_levels"):
            self.eval_levels = example_levels(self.paths.eval_file, self.eval_ex)
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


def _embedded_cfg(cfg: TrainConfig) -> TrainConfig:
    """A later stage of an embedded recipe starts from a checkpoint but keeps the embedded data."""
    import dataclasses
    return dataclasses.replace(cfg, model="embedded", stages=())


def _group_std(r: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Std of the reward within each group (TRL's reward_std is its mean over groups)."""
    if r.numel() == 0:
        return r.new_zeros(0)
    out = []
    for k in torch.unique(g):
        x = r[g == k]
        out.append(x.std() if x.numel() > 1 else x.new_zeros(()))
    return torch.stack(out)
