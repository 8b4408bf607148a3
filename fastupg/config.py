"""The training configuration: one frozen dataclass, loaded from YAML plus `key=value` overrides. It holds the
settings of the modules that use them as their own frozen dataclasses (`sampling`: SamplingConfig, `vllm`:
VLLMConfig, `hpt`: HPTConfig, `optim`: OptimConfig); a recipe names their fields by flat keys (FLAT_KEYS below).

Names follow TRL's GRPOConfig / TrainingArguments where a TRL name exists (num_generations,
temperature, max_completion_length, epsilon, epsilon_high, beta, loss_type, learning_rate,
per_device_train_batch_size, gradient_accumulation_steps, max_steps, save_steps, logging_steps,
eval_steps, seed, output_dir, max_grad_norm, warmup_ratio, lr_scheduler_type, ...).
`loss_type` selects the estimator. TRL's loss types (grpo, bnpo, dr_grpo, dapo, cispo) mean what TRL 1.16's
GRPOTrainer computes, together with TRL's epsilon / epsilon_high / beta (see `TRL_LOSS_TYPES` below and
tests/test_config_trl.py, which reads TRL's installed loss); fastupg's own presets (sft, reinforce, gspo, srft,
luffy, hpt) keep fastupg's meaning (fastupg.estimator.PRESETS). Where fastupg's meaning differs it has its own
name: aggregation `agg` (token-sum-norm is the old sum / C), `dual_clip`, `luffy_gamma`, ...

Every check runs in `TrainConfig.__post_init__`, i.e. BEFORE any model, data or process is touched:
an unknown key, a wrong type or an impossible combination is a ValueError/TypeError naming the key
(with a did-you-mean suggestion for typos).

Batch sizes (as in TRL, counted in completions): one optimizer step on one rank consumes
`per_device_train_batch_size * gradient_accumulation_steps` completions, i.e. that many divided by
`num_generations` prompts (for `sft`, which samples nothing, one demonstration per prompt). The
micro-batches are NOT fixed-size: the step's rows are packed under `max_tokens_per_microbatch`, and
the loss is normalised over the whole step, so the gradient equals that of one big batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from fastupg.hpt import SOFT_FUNCTIONS, HPTConfig
from fastupg.optim import SCHEDULERS, OptimConfig
from fastupg.rollout.base import SamplingConfig
from fastupg.rollout.vllm import VLLMConfig

# TRL's GRPOConfig.loss_type values fastupg expresses -> the fastupg preset they start from; their aggregation is TRL's
# (over the whole optimizer step here, like one big batch: TRL's micro-batch formulas with equal micro-batches):
#   grpo: per-sequence token mean, then mean over sequences    bnpo, dapo, cispo: token mean
#   dr_grpo: token sum / (sequences * max_completion_length)
TRL_LOSS_TYPES = {"grpo": "grpo", "bnpo": "grpo", "dr_grpo": "dr_grpo", "dapo": "dapo", "cispo": "cispo"}
TRL_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
           "dapo": "token-mean", "cispo": "token-mean"}
HPT_MODES = ("switch", "soft")
REWARDS = ("auto", "arith", "math")
REPORT_TO = ("jsonl", "tensorboard", "wandb")
ATTN = ("auto", "sdpa", "eager", "flash_attention_2")
ROLLOUT_ENGINES = ("hf", "vllm")
DTYPES = ("auto", "float32", "bfloat16")
AGG_SCOPES = ("step", "microbatch")


@dataclass(frozen=True, init=False)
class TrainConfig:
    # -- model and data ---------------------------------------------------------------------------
    model: str = "embedded"             # HF path/dir, or "embedded": the tiny model built by fastupg.task.tiny
    model_size: str = "tiny"            # embedded model size (fastupg.task.tiny.SIZES)
    embedded_dir: str = ".fastupg/embedded"  # where the embedded task/model is built (once)
    embedded_mix: tuple = ()            # embedded task difficulty mix, e.g. [[1, 0.6], [2, 0.3], [3, 0.1]]; () = default
    embedded_n_train: int = 0           # embedded training problems; 0 = fastupg.task.ArithConfig's default
    embedded_base_steps: int = -1       # base pretraining steps of the embedded model (fastupg.task.base);
                                        # -1 = the size's recipe (tiny: the demo's base), 0 = the random model
    train_file: str | None = None       # jsonl/json/parquet/folder/hub name (columns: below); None: embedded task
    eval_file: str | None = None
    reward: str = "auto"                # auto: arith for the embedded task, math otherwise
    system_prompt: str | None = "auto"  # auto: none for the embedded task, the paper's (LUFFY) prompt otherwise
    max_prompt_length: int | None = None  # prompt budget (tokens); None: what fits next to the completion,
    #                                     min(512, model positions - max_completion_length). The prompt budget plus
    #                                     max_completion_length must fit the model's positions (checked before any work)
    # -- data columns: "auto" detects from the first row, null = no such column; dotted paths reach nested fields.
    #    verl's names: data.prompt_key, data.response_key (its SFT demonstration), data.multiturn.messages_key;
    #    `fastupg data --config X.yaml` shows what was detected and what gets dropped (README "Train on your data")
    prompt_key: str = "auto"            # question text or chat messages (prompt/problem/question/...)
    answer_key: str | None = "auto"     # gold answer (reward_model.ground_truth/answer/...); null: the
    #                                     last \boxed{} of the demonstration (MATH, NuminaMath-CoT)
    response_key: str | None = "auto"   # demonstration for sft/hpt/luffy/srft (target/.../solution/generations)
    messages_key: str | None = "auto"   # a whole chat (TRL/verl `messages`): prompt = its last user turn,
    #                                     demonstration = its final assistant turn
    source_key: str | None = "auto"     # per-row source name (data_source/source)
    # -- estimator (TRL names where they exist) ---------------------------------------------------
    loss_type: str = "hpt"              # TRL: grpo bnpo dr_grpo dapo cispo; fastupg presets: sft gspo reinforce srft luffy hpt
    epsilon: float | None = None        # TRL's: ratio >= 1 - epsilon (None: TRL's 0.2 for TRL loss types, else the
                                        # preset's); cispo has no lower bound (as in TRL)
    epsilon_high: float | None = None   # TRL's: ratio <= 1 + epsilon_high (None: epsilon when that is set, else TRL's
                                        # 0.2 / the preset's); cispo: the ABSOLUTE cap min(ratio, epsilon_high) (TRL)
    dual_clip: float | None = None
    beta: float = 0.0                   # KL coefficient (TRL's k3 KL with use_bias_correction_kl=False); needs a reference model copy
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0           # entropy bonus (official HPT code: 0.001)
    scale_rewards: bool | None = None   # divide group advantages by std (None: preset; False = Dr.GRPO)
    agg: str | None = None              # aggregation mode override (fastupg.estimator.AGGS)
    offline_agg: str | None = None      # separate aggregation of demonstration tokens (official HPT: token-mean)
    agg_norm: float | None = None       # constant of seq-mean-token-sum-norm (None: max_completion_length)
    agg_scope: str = "step"             # over which tokens the aggregation runs (fastupg's name, docs/math.md §1.4):
    #                                     step: the whole optimizer step, all micro-batches and ranks (one big batch);
    #                                     microbatch: each micro-batch on its own, divided by
    #                                     gradient_accumulation_steps, averaged over ranks (verl's dp_actor; the
    #                                     official HPT code, configs/hpt-official.yaml)
    online_clip: bool = True            # False: on-policy branch without clipping (official HPT code)
    offline_coef: float | None = None   # coefficient of the demonstration branch (None: preset's 1.0)
    luffy_gamma: float | None = None    # LUFFY policy shaping gamma (None: preset's)
    # -- HPT routing (hpt_mode, hpt_gate, hpt_soft: the `hpt` sub-config below) --------------------------
    hpt_offline: str = "sft"            # what replaces RL on failed prompts (paper Table 5): sft, or offpolicy =
    #                                     LUFFY's off-policy RL branch (ref one, mixed-group advantage, gamma shaping)
    # -- sampling (num_generations, temperature, top_p, top_k, max_completion_length: `sampling` below; the vllm_*
    #    engine settings: `vllm` below) -------------------------------------------------------------
    rollout_engine: str = "hf"          # hf: transformers generate on the trainer's model; vllm: a vllm.LLM per rank
    # truncated importance sampling of the vLLM/trainer mismatch (fastupg.rollout.correction; TRL's names and modes;
    # defaults differ from TRL 1.16's sequence_mask / 3.0: token-level truncation at 2, verl's rollout_is_threshold)
    vllm_importance_sampling_correction: bool = True   # only with rollout_engine=vllm (HF: ratio 1, skipped)
    vllm_importance_sampling_mode: str = "token_truncate"  # token_truncate token_mask sequence_truncate sequence_mask
    vllm_importance_sampling_clip_max: float = 2.0     # the cap C: truncate min(rho, C); mask drops rho > C
    # -- optimisation (learning_rate, lr_scheduler_type, warmup_*, min_lr_ratio, weight_decay, adam_*,
    #    max_grad_norm: `optim` below) ------------------------------------------------------------
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_tokens_per_microbatch: int = 8192
    num_iterations: int = 1             # policy updates per generated batch (TRL's name; mu in GRPO)
    max_steps: int = 100
    seed: int = 42
    # -- systems ----------------------------------------------------------------------------------
    torch_dtype: str = "auto"           # parameters' dtype; auto: fp32 on CPU, bf16 mixed precision on GPU
    attn_implementation: str = "auto"   # auto: flash_attention_2 when installed on GPU, else sdpa
    gradient_checkpointing: bool = False
    use_liger_kernel: bool = True       # only takes effect on GPU with liger-kernel installed
    use_fused_loss: bool = True         # fastupg.kernels when available (torch reference otherwise)
    fsdp: bool = True                   # fully_shard the model when world size > 1
    loss_chunk_mb: int = 1024           # fused-linear loss: MiB of fp32 logits per chunk (the only vocab-sized buffer)
    rope_theta: float | None = None     # override the model config's RoPE base (None: the model's own)
    max_position_embeddings: int | None = None  # override the model's context length (None: the model's own)
    num_threads: int = 0                # CPU intra-op threads (torch.set_num_threads); 0: torch's default.
                                        # 1 is best for the tiny embedded model: its ops are too small to split,
                                        # and extra OpenMP threads thrash when other processes share the cores
    # -- output -----------------------------------------------------------------------------------
    output_dir: str = "runs/fastupg"
    logging_steps: int = 1
    save_steps: int = 50                # 0: save only at the end
    save_total_limit: int | None = 2
    eval_steps: int = 0                 # 0: no held-out evaluation during training
    eval_samples: int = 200             # held-out prompts per evaluation (greedy)
    eval_max_new_tokens: int | None = None  # None: max_completion_length
    eval_batch_size: int = 64
    report_to: tuple[str, ...] = ("jsonl", "tensorboard")
    wandb_project: str | None = None
    run_name: str | None = None
    plot: bool = True
    progress_bar: bool = True
    resume: bool | str = False          # True: latest complete checkpoint in output_dir; str: that checkpoint
    overwrite_output_dir: bool = False  # True: delete a previous run's files in output_dir (checkpoint-*, stage-*,
    #                                     metrics.jsonl, tensorboard/, run.png) and start afresh. Neither this nor
    #                                     resume: a run into a folder that holds a previous run is refused
    # -- multi-stage recipes (sft-then-grpo) --------------------------------------------------------
    stages: tuple = ()                  # tuple of dicts: per-stage overrides (each with its own max_steps)
    # -- sub-configs: the frozen dataclasses of the modules that use them. YAML, overrides and keyword arguments
    #    name their fields by the flat keys of FLAT_KEYS below (TRL's names), e.g. num_generations -> sampling.n;
    #    cfg.num_generations reads cfg.sampling.n. Their checks run in TrainConfig(...), naming the flat key.
    sampling: SamplingConfig = SamplingConfig()
    vllm: VLLMConfig = VLLMConfig(model="embedded", enable_sleep_mode=True)   # vllm.model is always `model`
    hpt: HPTConfig = HPTConfig()
    optim: OptimConfig = OptimConfig()

    def __init__(self, **kw):
        """Flat keys (FLAT_KEYS) and/or whole sub-configs; flat keys win over the sub-config they belong to."""
        unknown = [k for k in kw if k not in _PLAIN and k not in FLAT_KEYS]
        if unknown:
            raise TypeError(f"TrainConfig got unexpected keyword argument {unknown[0]!r}{_suggest(unknown[0])}")
        for name in _PLAIN:
            value = kw.get(name, _PLAIN[name].default)
            if name not in SUBCONFIGS:
                object.__setattr__(self, name, _checked_type(name, value))
        for group, cls in SUBCONFIGS.items():
            sub = kw.get(group, getattr(TrainConfig, group))
            if not isinstance(sub, cls):
                raise TypeError(f"config key {group!r} must be a {cls.__name__}, got {type(sub).__name__}")
            changes = {f: _checked_type(k, kw[k]) for k, (g, f) in FLAT_KEYS.items() if g == group and k in kw}
            for k, (g, f) in FLAT_KEYS.items():  # enumerations first: a did-you-mean names the flat key
                if g == group and f in changes and k in _CHOICES:
                    _one_of(k, changes[f], _CHOICES[k])
            if group == "vllm":
                changes["model"] = self.model
            object.__setattr__(self, group, _replace_sub(group, sub, changes))
        self.__post_init__()

    def __post_init__(self):
        from fastupg.estimator import AGGS, KL_ESTIMATORS, PRESETS
        _one_of("loss_type", self.loss_type, [p for p in PRESETS if p != "ppo"] + ["bnpo"],
                extra=" ('ppo' needs a value model, which the trainer does not train)" if self.loss_type == "ppo" else "")
        _one_of("reward", self.reward, REWARDS)
        _one_of("attn_implementation", self.attn_implementation, ATTN)
        _one_of("rollout_engine", self.rollout_engine, ROLLOUT_ENGINES)
        from fastupg.rollout.correction import IS_MODES
        _one_of("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, IS_MODES)
        if not (math.isfinite(self.vllm_importance_sampling_clip_max) and self.vllm_importance_sampling_clip_max > 0):
            raise ValueError(f"vllm_importance_sampling_clip_max must be finite and > 0, "
                             f"got {self.vllm_importance_sampling_clip_max}")
        _one_of("torch_dtype", self.torch_dtype, DTYPES)
        from fastupg.task.tiny import SIZES
        _one_of("model_size", self.model_size, list(SIZES))  # before anything is built
        if self.overwrite_output_dir and self.resume is not False:
            raise ValueError(f"resume={self.resume!r} and overwrite_output_dir=true contradict each other: "
                             "continue the run in output_dir, or replace it, not both")
        _one_of("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _one_of("agg_scope", self.agg_scope, AGG_SCOPES)
        for k in ("agg", "offline_agg"):
            if getattr(self, k) is not None:
                _one_of(k, getattr(self, k), AGGS)
        for r in self.report_to:
            _one_of("report_to", r, REPORT_TO)
        if not self.output_dir.strip():  # Path("") is the current directory: a run would write into it
            raise ValueError("output_dir must not be empty")
        if self.embedded_mix:
            from fastupg.task import ArithConfig
            try:
                ArithConfig(mix=self.embedded_task_mix)
                from fastupg.task.arith import generate_splits  # noqa: F401  (level sizes are checked at build)
            except (TypeError, ValueError) as e:
                raise ValueError(f"embedded_mix={list(self.embedded_mix)!r}: {e}") from None
        if self.embedded_base_steps < -1:
            raise ValueError(f"embedded_base_steps must be >= 0 (or -1: the model size's recipe), "
                             f"got {self.embedded_base_steps}")
        positive = ("num_generations", "max_completion_length", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "max_tokens_per_microbatch", "max_steps", "logging_steps",
                    "eval_samples", "eval_batch_size", "num_iterations", "loss_chunk_mb")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1 or null, got {self.max_prompt_length}")
        for k in positive:
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("save_steps", "eval_steps", "warmup_steps", "num_threads", "embedded_n_train"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        for k in ("learning_rate", "temperature"):
            if not (math.isfinite(getattr(self, k)) and getattr(self, k) > 0):
                raise ValueError(f"{k} must be finite and > 0, got {getattr(self, k)}")
        if self.rope_theta is not None and not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be finite and > 0 (or null), got {self.rope_theta}")
        if self.max_position_embeddings is not None and self.max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings must be >= 1 (or null), got {self.max_position_embeddings}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for k in ("beta", "entropy_coef", "weight_decay"):
            if not (math.isfinite(getattr(self, k)) and getattr(self, k) >= 0):
                raise ValueError(f"{k} must be finite and >= 0, got {getattr(self, k)}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or null, got {self.save_total_limit}")
        if self.wandb_project is not None and "wandb" not in self.report_to:
            raise ValueError("wandb_project is set but 'wandb' is not in report_to")
        # -- combinations --
        if self.loss_type != "sft":
            if self.completions_per_step % self.num_generations:
                raise ValueError(
                    f"per_device_train_batch_size * gradient_accumulation_steps = {self.completions_per_step} "
                    f"must be a multiple of num_generations = {self.num_generations} (whole groups per rank)")
            if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "gspo", "hpt") and self.num_generations < 2:
                raise ValueError(f"loss_type={self.loss_type!r} compares rollouts within a group: "
                                 f"num_generations must be >= 2, got {self.num_generations}")
        if self.num_iterations > 1 and self.loss_type == "sft":
            raise ValueError("num_iterations > 1 means nothing for loss_type='sft' (no rollouts)")
        if self.hpt_mode != "switch" and self.loss_type != "hpt":
            raise ValueError(f"hpt_mode={self.hpt_mode!r} only applies to loss_type='hpt'")
        _one_of("hpt_offline", self.hpt_offline, ("sft", "offpolicy"))
        if self.hpt_offline != "sft" and self.loss_type != "hpt":
            raise ValueError(f"hpt_offline={self.hpt_offline!r} only applies to loss_type='hpt'")
        if self.luffy_gamma is not None and self.loss_type not in ("luffy", "srft") and self.hpt_offline != "offpolicy":
            raise ValueError("luffy_gamma only applies to loss_type 'luffy' or 'srft', or to hpt with "
                             "hpt_offline='offpolicy' (ref='one' demonstrations)")
        self._check_columns()
        self.estimator()  # the Estimator's own checks (clip bounds, aggregation, ...) with key names below
        if self.model == "embedded":  # its positions are known without touching a file
            from fastupg.task.tiny import SIZES
            _one_of("model_size", self.model_size, sorted(SIZES))
            budget = _fit_positions(self, SIZES[self.model_size].max_position_embeddings,
                                    f"the embedded model (model_size={self.model_size!r})")
            object.__setattr__(self, "max_prompt_length", budget)
        for i, st in enumerate(self.stages):
            if not isinstance(st, dict):
                raise TypeError(f"stages[{i}] must be a mapping of overrides, got {type(st).__name__}")
            if "stages" in st:
                raise ValueError(f"stages[{i}] cannot itself contain 'stages'")
            _check_keys(st, where=f"stages[{i}]")
        if self.stages:
            self.stage_configs()  # validate every stage now, before any work

    def _check_columns(self) -> None:
        """The data-column keys make sense together (the columns themselves are checked against the file by
        fastupg.data.datasets before the model is loaded)."""
        keys = ("prompt_key", "answer_key", "response_key", "messages_key", "source_key")
        for k in keys:
            v = getattr(self, k)
            if v is not None and (not v.strip() or v != v.strip() or any(not p for p in v.split("."))):
                raise ValueError(f"{k}={v!r} must be a column name (dotted for nested fields, e.g. "
                                 "reward_model.ground_truth), 'auto' or null")
        if self.messages_key not in ("auto", None) and self.prompt_key != "auto":
            raise ValueError(f"messages_key={self.messages_key!r} gives the prompt; prompt_key={self.prompt_key!r} "
                             "cannot be set with it (leave it 'auto')")
        needs_demo = self.estimator().offline is not None
        if needs_demo and self.response_key is None:
            raise ValueError(f"loss_type={self.loss_type!r} trains on demonstrations: response_key cannot be null "
                             "(name the demonstration column, or leave it 'auto')")
        if self.answer_key is None and self.response_key is None and self.loss_type != "sft":
            raise ValueError("answer_key=null takes the gold answer from the demonstration's last \\boxed{}, "
                             "but response_key is null too: name one of them")

    def column_keys(self) -> dict:
        """The column keys as fastupg.data.datasets.detect_columns arguments (the ones not 'auto')."""
        names = {"prompt_key": "prompt", "answer_key": "answer", "response_key": "target",
                 "messages_key": "messages", "source_key": "source"}
        return {f: getattr(self, k) for k, f in names.items() if getattr(self, k) != "auto"}

    # -- derived ------------------------------------------------------------------------------------
    @property
    def embedded_task_mix(self) -> tuple:
        try:
            return tuple((int(d), float(w)) for d, w in self.embedded_mix)
        except (TypeError, ValueError):
            raise ValueError(f"embedded_mix must be pairs [difficulty, weight], got {self.embedded_mix!r}") from None

    @property
    def completions_per_step(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def prompts_per_step(self) -> int:
        """Prompts one rank consumes per optimizer step."""
        if self.loss_type == "sft":
            return self.completions_per_step
        return self.completions_per_step // self.num_generations

    @property
    def total_steps(self) -> int:
        return sum(c.max_steps for c in self.stage_configs()) if self.stages else self.max_steps

    def stage_configs(self) -> list["TrainConfig"]:
        """One config per stage (the stage's overrides on top of this config), or [self]."""
        if not self.stages:
            return [self]
        out = []
        for i, st in enumerate(self.stages):
            try:
                out.append(dataclasses.replace(self, stages=(), **_coerce_all(st)))
            except (TypeError, ValueError) as e:
                raise type(e)(f"stages[{i}]: {e}") from None
        return out

    def estimator(self):
        """The fastupg.Estimator this config trains with (preset + overrides)."""
        from fastupg.estimator import Branch, Estimator
        ov: dict = {}
        trl_type = self.loss_type in TRL_LOSS_TYPES
        preset = TRL_LOSS_TYPES.get(self.loss_type, self.loss_type)
        if self.loss_type == "cispo":
            # TRL's CISPO: weight = sg(min(ratio, epsilon_high)), epsilon_high absolute (defaulting to epsilon); no
            # lower bound (eps_low = 1: the bound 1 - eps_low = 0 is never active)
            cap = self.epsilon_high if self.epsilon_high is not None else self.epsilon
            if cap is not None:
                if cap < 1:
                    key = "epsilon_high" if self.epsilon_high is not None else "epsilon"
                    raise ValueError(f"{key}={cap} with loss_type='cispo': TRL's CISPO caps the ratio at epsilon_high "
                                     "(absolute, defaulting to epsilon; TRL's docs suggest 5.0): it must be >= 1")
                ov["eps_high"] = cap - 1.0
        elif trl_type or self.epsilon is not None or self.epsilon_high is not None:
            # TRL: ratio clipped to [1 - epsilon, 1 + epsilon_high], epsilon = 0.2 and epsilon_high = epsilon by default
            base_eps = Estimator.preset(preset).eps_low
            eps = self.epsilon if self.epsilon is not None else (0.2 if trl_type else base_eps)
            if self.epsilon is not None or trl_type:
                ov["eps_low"] = eps
            if self.epsilon_high is not None:
                ov["eps_high"] = self.epsilon_high
            elif self.epsilon is not None or trl_type:
                ov["eps_high"] = eps
        if self.agg is None and self.loss_type in TRL_AGG:
            ov["agg"] = TRL_AGG[self.loss_type]
        if self.dual_clip is not None:
            ov["dual_clip"] = self.dual_clip
        if self.beta:
            ov["kl_coef"] = self.beta
        ov["kl_estimator"] = self.kl_estimator
        if self.entropy_coef:
            ov["entropy_coef"] = self.entropy_coef
        if self.scale_rewards is not None:
            ov["adv_std"] = self.scale_rewards
        if self.agg is not None:
            ov["agg"] = self.agg
        if self.offline_agg is not None:
            ov["offline_agg"] = self.offline_agg
        if self.agg_norm is not None:
            ov["agg_norm"] = self.agg_norm
        if self.luffy_gamma is not None:
            ov["gamma"] = self.luffy_gamma
        base = Estimator.preset(preset)
        if not self.online_clip:
            if base.online is None:
                raise ValueError(f"online_clip=false: loss_type={self.loss_type!r} has no on-policy branch")
            ov["online"] = dataclasses.replace(base.online, mask="none")
        if self.offline_coef is not None:
            if base.offline is None:
                raise ValueError(f"offline_coef: loss_type={self.loss_type!r} has no demonstration branch")
            ov["offline"] = dataclasses.replace(base.offline, coef=self.offline_coef)
        if self.hpt_offline == "offpolicy":  # Table 5: off-policy RL on the demonstrations instead of SFT
            luffy = Estimator.preset("luffy")
            coef = ov["offline"].coef if "offline" in ov else base.offline.coef
            ov["offline"] = dataclasses.replace(luffy.offline, coef=coef)
            ov.setdefault("gamma", luffy.gamma)
        try:
            return dataclasses.replace(Estimator.preset(preset, **ov), name=self.loss_type)
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid estimator settings for loss_type={self.loss_type!r}: {e}") from None

    def to_dict(self) -> dict:
        """Flat, as a YAML recipe names the keys (checkpoints and loggers store this)."""
        d = {k: getattr(self, k) for k in KEYS}
        d["report_to"] = list(self.report_to)
        d["stages"] = [dict(s) for s in self.stages]
        return d


# -- the sub-configs and their flat keys ---------------------------------------------------------------
SUBCONFIGS = {"sampling": SamplingConfig, "vllm": VLLMConfig, "hpt": HPTConfig, "optim": OptimConfig}
# flat key (YAML, CLI override, TRL's name) -> (sub-config, its field); docs/trainer.md "Configuration"
FLAT_KEYS: dict[str, tuple[str, str]] = {
    "num_generations": ("sampling", "n"),
    "temperature": ("sampling", "temperature"),
    "top_p": ("sampling", "top_p"),
    "top_k": ("sampling", "top_k"),
    "max_completion_length": ("sampling", "max_new_tokens"),
    "vllm_gpu_memory_utilization": ("vllm", "gpu_memory_utilization"),
    "vllm_tensor_parallel_size": ("vllm", "tensor_parallel_size"),
    "vllm_enable_sleep_mode": ("vllm", "enable_sleep_mode"),   # free the KV cache while training (GPU only)
    "hpt_mode": ("hpt", "mode"),
    "hpt_gate": ("hpt", "gate"),
    "hpt_soft": ("hpt", "soft"),
    **{f.name: ("optim", f.name) for f in dataclasses.fields(OptimConfig)},
}


def _alias(group: str, name: str) -> property:
    return property(lambda self: getattr(getattr(self, group), name),
                    doc=f"the flat name of {group}.{name}")


for _k, (_g, _f) in FLAT_KEYS.items():
    setattr(TrainConfig, _k, _alias(_g, _f))


# -- checks that look at the file system (the CLI runs them before any work) ------------------------------
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


def check_model_path(key: str, value: str) -> None:
    """A local model folder must exist and hold config.json; anything else must look like a Hub repo id."""
    if value == "embedded":
        return
    p = Path(value).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{key}={value!r} is a file; give the model's folder (config.json, weights, tokenizer)")
        if not (p / "config.json").is_file():
            raise ValueError(f"{key}={value!r} has no config.json: not a Hugging Face model folder")
        return
    if not _REPO_ID.match(value) or value.startswith((".", "~")):
        raise ValueError(f"{key}={value!r}: no such folder (and not a Hugging Face repo id such as "
                         f"'Qwen/Qwen2.5-Math-7B')")


def check_data_path(key: str, value: str | None) -> None:
    """A data file named by its suffix must exist (dataset names and folders are left to the loader)."""
    if value is not None and value.endswith(DATA_SUFFIXES) and not Path(value).expanduser().is_file():
        raise ValueError(f"{key}={value!r}: no such file")


# -- the context: prompt budget + completion must fit the model's positions ---------------------------
DEFAULT_PROMPT_BUDGET = 512


def _fit_positions(cfg: TrainConfig, positions: int, what: str) -> int:
    """The prompt budget (max_prompt_length, None resolved to what fits); a ValueError when the budget plus the
    completion exceed the model's positions: vLLM would refuse that max_model_len, and HF generate would run
    past the positions the model was trained for."""
    budget = cfg.max_prompt_length
    if budget is None:
        budget = min(DEFAULT_PROMPT_BUDGET, positions - cfg.max_completion_length)
        if budget < 1:
            raise ValueError(f"max_completion_length ({cfg.max_completion_length}) leaves no room for a prompt in the "
                             f"{positions} positions of {what} (max_position_embeddings); lower it")
    if budget + cfg.max_completion_length > positions:
        raise ValueError(
            f"max_prompt_length ({budget}) + max_completion_length ({cfg.max_completion_length}) = "
            f"{budget + cfg.max_completion_length} exceeds the {positions} positions of {what} "
            f"(max_position_embeddings); lower max_prompt_length or max_completion_length")
    return budget


def model_positions(model: str) -> int | None:
    """max_position_embeddings of a checkpoint's config (reads config.json only), None if it has none."""
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(model)
    text = c.get_text_config() if hasattr(c, "get_text_config") else c
    n = getattr(text, "max_position_embeddings", None)
    return int(n) if n else None


def fit_model_positions(cfg: TrainConfig, local_only: bool = False) -> TrainConfig:
    """The context check for a checkpoint model (the embedded one is checked in __post_init__): a ValueError
    naming the keys when the prompt budget plus the completion exceed its positions; max_prompt_length=None
    resolved. Reads the checkpoint's config only; local_only: skip hub names (the trainer checks them)."""
    if cfg.model == "embedded" or (local_only and not Path(cfg.model).is_dir()):
        return cfg
    positions = cfg.max_position_embeddings or model_positions(cfg.model)  # the recipe's context override first
    budget = (cfg.max_prompt_length or DEFAULT_PROMPT_BUDGET) if positions is None else \
        _fit_positions(cfg, positions, f"model {cfg.model!r}")
    return cfg if budget == cfg.max_prompt_length else dataclasses.replace(cfg, max_prompt_length=budget)


# -- loading ----------------------------------------------------------------------------------------
_PLAIN = {f.name: f for f in dataclasses.fields(TrainConfig)}     # the dataclass's own fields (sub-configs too)
_HINTS = {**{k: h for k, h in typing.get_type_hints(TrainConfig).items() if k not in SUBCONFIGS},
          **{k: typing.get_type_hints(SUBCONFIGS[g])[f] for k, (g, f) in FLAT_KEYS.items()}}
KEYS = [k for k in _PLAIN if k not in SUBCONFIGS] + list(FLAT_KEYS)   # every flat key a recipe may set
_CHOICES = {"hpt_mode": HPT_MODES, "hpt_soft": sorted(SOFT_FUNCTIONS), "lr_scheduler_type": SCHEDULERS}


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, KEYS, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _check_keys(d: dict, where: str = "config") -> None:
    for k in d:
        if k not in KEYS:
            raise ValueError(f"unknown {where} key {k!r}{_suggest(str(k))} (see fastupg/config.py for all keys)")


def _one_of(key, value, allowed, extra=""):
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{key}={value!r} is not one of {list(allowed)}{hint}{extra}")


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple or hint is tuple:
        return isinstance(value, tuple)
    return isinstance(value, hint)


def _checked_type(name: str, v):
    """v if it has the flat key's type (an int where a float is expected becomes a float), else a TypeError."""
    if not _type_ok(v, _HINTS[name]):
        raise TypeError(f"config key {name!r} must be {_HINTS[name]}, got {v!r} ({type(v).__name__})")
    if isinstance(v, int) and not isinstance(v, bool) and _HINTS[name] in (float, float | None):
        return float(v)
    return v


def _replace_sub(group: str, sub, changes: dict):
    """The sub-config with `changes`; its own checks' errors name the flat key (SamplingConfig.n -> num_generations)."""
    names = {f: k for k, (g, f) in FLAT_KEYS.items() if g == group}
    with named_errors(SUBCONFIGS[group], names):
        return dataclasses.replace(sub, **changes)


@contextlib.contextmanager
def named_errors(cls, names: dict):
    """A TypeError/ValueError from cls's own checks ("SamplingConfig.top_p must be ...") re-raised with the name the
    user typed ({"top_p": "--top-p"}): one check, worded for each front end (YAML key, CLI option)."""
    try:
        yield
    except (TypeError, ValueError) as e:
        msg = str(e)
        for field_name, user_name in names.items():
            msg = re.sub(rf"\b{cls.__name__}\.{field_name}\b", user_name, msg)
        raise type(e)(msg) from None


def _parse_scalar(text: str):
    """A command-line value: YAML scalar rules (1e-5, true, null, [a, b])."""
    import yaml
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return _maybe_number(v)


def _maybe_number(v):
    """YAML 1.1 reads '1e-5' (no dot) as a string; numbers are what people mean."""
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            pass
        try:
            f = float(v)
            return f if math.isfinite(f) else v
        except ValueError:
            return v
    return v


def _coerce(key: str, value):
    """Bring a YAML/CLI value to the field's type where that is unambiguous (list -> tuple, 1 -> 1.0)."""
    hint = _HINTS[key]
    if hint in (float, float | None, int, int | None):
        value = _maybe_number(value)
    if key == "report_to":
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value not in ("none", "") else []
        if isinstance(value, list):
            return tuple(value)
    if key == "stages" and isinstance(value, list):
        return tuple(value)
    if key == "resume" and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, int) and not isinstance(value, bool) and hint in (float, float | None):
        return float(value)
    if hint in (str, str | None) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _coerce_all(d: dict) -> dict:
    _check_keys(d)
    return {k: _coerce(k, v) for k, v in d.items()}


def parse_overrides(items) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"override {it!r} must look like key=value")
        k, v = it.split("=", 1)
        k = k.strip().lstrip("-").replace("-", "_")
        if k not in KEYS:
            raise ValueError(f"unknown config key {k!r}{_suggest(k)} (from override {it!r})")
        out[k] = _parse_scalar(v)
    return out


def load_config(path: str | Path | None = None, overrides=(), **kwargs) -> TrainConfig:
    """YAML file (may be None) + `key=value` strings + keyword overrides -> validated TrainConfig."""
    import yaml
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"--config {str(path)!r}: no such file")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:  # e.g. --config README.md: one line, not a scanner traceback
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            what = getattr(e, "problem", None) or type(e).__name__
            raise ValueError(f"--config {str(path)!r} is not a YAML recipe: {what}{where}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {str(path)!r}: top level must be a mapping of keys, got {type(loaded).__name__}")
        data.update(loaded)
    given = {**parse_overrides(overrides), **kwargs}
    data.update(given)
    cfg = TrainConfig(**_coerce_all(data))
    if cfg.stages:  # an override of a key that every stage sets itself would be silently ignored
        for k in given:
            if k != "stages" and all(k in st for st in cfg.stages):
                raise ValueError(f"{k}={given[k]!r} has no effect: every stage of this recipe sets its own {k} "
                                 f"(stages[i].{k}); change it in the recipe's stages")
    return cfg
