"""TRL drop-in: `FusedGRPOTrainer`, TRL's `GRPOTrainer` whose loss is fastupg's fused-linear loss.

    from fastupg.integrations.trl import FusedGRPOTrainer
    trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(loss_type="dapo", ...), train_dataset=...)
    trainer.train()

Everything but the loss is TRL's own (generation, rewards, advantages, old/reference log-probs, vLLM, logging).
`_compute_loss` is replaced: the backbone's last hidden states at the completion positions go with the lm_head weight
into `fastupg.kernels.fused_linear_logprobs` (impl 'chunked' by default: at most one chunk of logits exists at a time,
the B x T x V logits never do), and `fastupg.policy_loss` turns the per-token log-probs into TRL's loss.

What each GRPOConfig argument means here -- exactly what it means in TRL 1.16's GRPOTrainer._compute_loss:
  loss_type          grpo (per-sequence token mean, then mean over the B sequences of the micro-batch), bnpo (token
                     mean of the micro-batch), dr_grpo (token sum / (B * max_completion_length)); all three / gradient
                     accumulation steps. dapo and cispo: token sum / the generation batch's token count
                     (num_items_in_batch) rescaled to one accumulation window. sapo, vespo, luspo: NotImplementedError.
  importance_sampling_level='sequence'   GSPO's sequence ratio (fastupg Branch ref='seq'), any clip loss type
  epsilon, epsilon_high  ratio clipped to [1 - epsilon, 1 + epsilon_high] (epsilon_high None: epsilon);
                     cispo: the weight is min(ratio, epsilon_high), an ABSOLUTE cap (TRL's docs suggest 5.0)
  delta              INTELLECT-2 two-sided clip = fastupg's dual_clip (must be > 1 + epsilon_high)
  beta               k3 KL to the reference model's log-probs (TRL computes them: inputs['ref_per_token_logps']);
                     use_bias_correction_kl (TRL's default) multiplies it by the (differentiable) ratio: that term is
                     not a unified-estimator term, so the drop-in adds it itself on the same fused log-probs
  entropy_coef       loss -= entropy_coef * token-mean entropy / accumulation steps (not per loss type)
  top_entropy_quantile, off_policy_mask_threshold, vllm_importance_sampling_correction: the per-token factors TRL
                     multiplies the policy term by (not the KL term); here folded into the advantage, which is exact
                     since each factor is >= 0: -min(r A, clip(r) A) * w = -min(r (A w), clip(r) (A w)) (at
                     sequence level the factor's per-sequence mean is folded in: see _compute_loss)
Metrics are logged under TRL's names with TRL's definitions: entropy, kl, clip_ratio/{low_mean,low_min,high_mean,
high_max,region_mean} (clip loss types), cispo_clip_ratio (cispo), policy_loss (with an entropy bonus).
Not supported (NotImplementedError at construction): use_adaptive_entropy, MoE router aux
loss, multimodal inputs, models whose logits are post-processed (softcapping, logit scales).

Hybrid post-training (what TRL cannot do): `FusedGRPOTrainer(..., fastupg_preset="hpt" | "luffy" | "srft",
demonstration_column="solution")` adds, per prompt group, the dataset's demonstration as one more completion row
marked off-policy; fastupg's estimator handles it (SFT branch with A = 1 for HPT; off-policy ref 'one' branch with the
group's mixed advantage for LUFFY/SRFT). See `_hybrid_rows`.
"""
from __future__ import annotations

import functools
import types

import torch

from fastupg.estimator import Branch, Estimator, policy_loss
from fastupg.kernels.fused_linear import fused_linear_logprobs

try:
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without TRL
    raise ImportError("fastupg.integrations.trl needs TRL: pip install 'trl>=1.16'") from e

TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
                    "mm_token_type_ids", "spatial_shapes", "image_position_ids")
HIDDEN_FLAG = "fastupg_hidden_states"


# -- TRL's loss as a fastupg estimator + aggregation weights ----------------------------------------------------------
def trl_estimator(loss_type: str, *, epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                  importance_sampling_level: str = "token", delta: float | None = None) -> Estimator:
    """The fastupg Estimator whose per-token loss is TRL's GRPOTrainer per-token loss for these GRPOConfig values.

    The aggregation is left to the caller (`trl_aggregation_weights`): TRL's normalisers depend on the batch.
    """
    if loss_type not in TRL_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: fastupg expresses TRL's {list(TRL_LOSS_TYPES)} "
                         "(sapo, vespo and luspo are not unified-estimator losses)")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r} is not 'token' or 'sequence'")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if loss_type == "cispo":
        if importance_sampling_level != "token":
            raise NotImplementedError("loss_type='cispo' with importance_sampling_level='sequence' is not expressible "
                                      "in fastupg (its CISPO branch needs token ratios)")
        if delta is not None:
            raise ValueError("delta only applies to the clip loss types (TRL ignores it for cispo)")
        if eps_high < 1:
            raise ValueError(f"epsilon_high={eps_high} with loss_type='cispo': TRL's CISPO weight is min(ratio, "
                             "epsilon_high), an absolute cap on the ratio (TRL's docs suggest 5.0); fastupg needs "
                             "a cap >= 1")
        # fastupg's cispo mask clamps the detached ratio to [1 - eps_low, 1 + eps_high]: eps_low = 1 puts the lower
        # bound at 0 (never active, as in TRL) and 1 + eps_high = TRL's absolute cap
        return Estimator(online=Branch("old", "cispo", "grpo"), eps_low=1.0, eps_high=eps_high - 1.0,
                         kl_coef=beta, kl_estimator="k3", agg="token-sum", name="trl-cispo")
    ref = "seq" if importance_sampling_level == "sequence" else "old"
    dual = None
    if delta is not None:
        # TRL clamps the ratio at delta before the min: for A < 0 that caps the loss at -delta * A (= fastupg's dual
        # clip), for A > 0 the clipped term is already the smaller one. Equal only when delta > 1 + epsilon_high.
        if not delta > 1 + eps_high:
            raise ValueError(f"delta={delta} must be > 1 + epsilon_high = {1 + eps_high} for fastupg's dual clip to be "
                             "TRL's two-sided clip")
        dual = float(delta)
    return Estimator(online=Branch(ref, "clip", "grpo"), eps_low=float(epsilon), eps_high=float(eps_high),
                     dual_clip=dual, kl_coef=beta, kl_estimator="k3", agg="token-sum", name=f"trl-{loss_type}")


def trl_aggregation_weights(loss_type: str, mask: torch.Tensor, *, max_completion_length: int | None = None,
                            accumulation_steps: float = 1.0, dapo_normalizer=None) -> torch.Tensor:
    """(B, T) weights s such that TRL's aggregated loss is sum(s * per_token_loss) (mask is the (B, T) loss mask).

    grpo:    mean over the B rows of (row token sum / row token count), / accumulation_steps
    bnpo:    token sum / token count of the micro-batch, / accumulation_steps
    dr_grpo: token sum / (B * max_completion_length), / accumulation_steps
    dapo, cispo: token sum / dapo_normalizer (TRL: num_items_in_batch / processes * accumulation / steps_per_generation)
    """
    m = mask.to(torch.float64)
    B = m.shape[0]
    if loss_type == "grpo":
        return m / (m.sum(-1, keepdim=True).clamp_min(1.0) * B * accumulation_steps)
    if loss_type == "bnpo":
        return m / (m.sum().clamp_min(1.0) * accumulation_steps)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return m / (B * max_completion_length * accumulation_steps)
    if loss_type in ("dapo", "cispo"):
        if dapo_normalizer is None:
            raise ValueError(f"loss_type={loss_type!r} needs dapo_normalizer (TRL: from num_items_in_batch)")
        return m / torch.as_tensor(dapo_normalizer, dtype=m.dtype, device=m.device)
    raise ValueError(f"loss_type={loss_type!r} is not one of {list(TRL_LOSS_TYPES)}")


# -- the model: last hidden states through whatever wraps it ----------------------------------------------------------
def _decoder(model):
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None:
        body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if body is None:
        raise TypeError(f"{type(model).__name__} exposes no decoder body (get_decoder()): not a causal LM")
    return body


def add_hidden_states_forward(model) -> None:
    """Patch `model.forward` so that `model(..., fastupg_hidden_states=True)` returns the backbone's last hidden state
    (B, T, D) and never calls the lm_head. Called through the wrapped model (DDP, accelerate), like TRL's fused head."""
    if getattr(model, "_fastupg_hidden_forward", False):
        return
    inner = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        if not kwargs.pop(HIDDEN_FLAG, False):
            return inner(*args, **kwargs)
        kwargs["use_cache"] = False
        out = _decoder(self)(*args, **kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    model.forward = types.MethodType(forward, model)
    model._fastupg_hidden_forward = True


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class FusedGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with fastupg's fused-linear policy loss (see the module docstring).

    Extra keyword arguments:
      fastupg_impl:      'chunked' (default; never more than one chunk of logits), 'triton' (CUDA), or 'torch'
                         (materialises the logits: for checking only)
      fastupg_chunk_bytes: bytes of fp32 logits per chunk of the chunked impl (None: fastupg's default, 1 GiB)
      fastupg_preset:    None (TRL's loss_type), or 'hpt' / 'luffy' / 'srft' for hybrid post-training with
                         demonstrations in the batch (needs demonstration_column)
      demonstration_column: dataset column with the demonstration completion text (hybrid presets)
    """

    def __init__(self, *args, fastupg_impl: str = "chunked", fastupg_chunk_bytes: int | None = None,
                 fastupg_preset: str | None = None, demonstration_column: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        unsupported = [("use_adaptive_entropy", a.use_adaptive_entropy),
                       ("MoE router aux loss (router_aux_loss_coef)", self.aux_loss_enabled)]
        bad = [name for name, on in unsupported if on]
        if bad:
            raise NotImplementedError(f"FusedGRPOTrainer does not support {', '.join(bad)}")
        if fastupg_impl not in ("chunked", "triton", "torch"):
            raise ValueError(f"fastupg_impl={fastupg_impl!r} is not one of ['chunked', 'triton', 'torch']")
        self.fastupg_impl = fastupg_impl
        self.fastupg_chunk_bytes = fastupg_chunk_bytes
        base = _base(self.model)
        from fastupg.models.hf_loss import _check_model
        _check_model(base)  # softcapping / logit scales: the fused path computes plain h @ W^T + b
        add_hidden_states_forward(base)
        self.fastupg_preset = fastupg_preset
        self.demonstration_column = demonstration_column
        # use_bias_correction_kl (TRL's default): the KL term is KL_t * ratio_t, ratio differentiable -- not a unified-
        # estimator term, so the drop-in adds it on the same log-probs and the estimator carries no KL
        self._kl_outside = self.beta != 0.0 and bool(a.use_bias_correction_kl)
        if fastupg_preset is None:
            self.fastupg_estimator = trl_estimator(self.loss_type, epsilon=self.epsilon_low,
                                                   epsilon_high=self.epsilon_high,
                                                   beta=0.0 if self._kl_outside else self.beta,
                                                   importance_sampling_level=self.importance_sampling_level,
                                                   delta=a.delta)
        else:
            self.fastupg_estimator = _hybrid_estimator(fastupg_preset, self)
            if demonstration_column is None:
                raise ValueError(f"fastupg_preset={fastupg_preset!r} needs demonstration_column= (the dataset column "
                                 "holding each prompt's demonstration)")

    # -- per-token log-probs and entropy from the hidden states --------------------------------------------------
    def _fastupg_logps(self, model, input_ids, attention_mask, completion_ids, completion_mask):
        """(B, Tc) log-probs and entropies of the completion tokens at TRL's temperature, 0 where completion_mask
        is 0 (as TRL's own fused head returns them), differentiable; the lm_head is never called."""
        Tc = completion_ids.size(1)
        with self.accelerator.autocast():
            h = model(input_ids=input_ids, attention_mask=attention_mask, **{HIDDEN_FLAG: True})
        h = h[:, -Tc - 1:-1]  # position t predicts token t + 1: the completion is predicted from one step earlier
        head = _base(self.accelerator.unwrap_model(model)).get_output_embeddings()
        from fastupg.models.hf_loss import _head_params
        w, b = _head_params(_fake_model(head))
        valid = completion_mask.bool()
        hv, tv = h[valid], completion_ids[valid]
        if self.args.cast_lm_head_to_fp32:
            hv, w, b = hv.float(), w.float(), None if b is None else b.float()
        elif hv.dtype != w.dtype:
            # autocast ran the backbone in 16 bits; the lm_head would run in that dtype too (TRL does the same)
            w = w.to(hv.dtype)
            b = None if b is None else b.to(hv.dtype)
        kw = {} if self.fastupg_chunk_bytes is None else {"chunk_bytes": int(self.fastupg_chunk_bytes)}
        lp, ent = fused_linear_logprobs(hv, w, tv.to(hv.device), self.temperature, return_entropy=True, bias=b,
                                        impl=self.fastupg_impl, **kw)
        zeros = lp.new_zeros(valid.shape)
        return zeros.masked_scatter(valid, lp), zeros.masked_scatter(valid, ent)

    # -- the loss ------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        for k in _MULTIMODAL_KEYS:
            if inputs.get(k) is not None:
                raise NotImplementedError(f"FusedGRPOTrainer: multimodal input {k!r} is not supported")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logp, entropies = self._fastupg_logps(model, input_ids, attention_mask, completion_ids, completion_mask)
        mode = "train" if self.model.training else "eval"
        gas = self.current_gradient_accumulation_steps if mode == "train" else 1.0

        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old

        # TRL's per-token factors of the policy term (each >= 0): folded into the advantage (exact, see docstring)
        factor = torch.ones_like(logp, dtype=torch.float32)
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies.detach(), mask, 1 - self.top_entropy_quantile)
            factor = factor * entropy_mask
        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps", old)
            factor = factor * self.get_off_policy_mask(advantages=advantages, per_token_logps=logp,
                                                       sampling_per_token_logps=sampling, mask=mask,
                                                       off_policy_threshold=self.off_policy_mask_threshold)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            factor = factor * inputs["importance_sampling_ratio"]
        if self.importance_sampling_level == "sequence":
            # TRL multiplies the per-SEQUENCE loss L_i(s_i) by per-token factors w_t, and the gradient of s_i is spread
            # evenly over the sequence's tokens; fastupg's sequence branch gives token t the gradient of its own term.
            # The two agree when the factor is constant along the sequence: use its masked mean (same value, since
            # sum_t w_t L_i = |m_i| * mean(w) * L_i, and TRL's aggregation weights are constant along a sequence)
            mf = mask.to(factor.dtype)
            factor = factor.expand_as(logp)
            factor = ((factor * mf).sum(-1, keepdim=True) / mf.sum(-1, keepdim=True).clamp(min=1.0))
        adv_tok = (advantages * factor).to(logp.dtype).expand_as(logp)

        ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        if ref is not None:  # TRL's reference log-probs are 0 on padding, like ours: mask handles both
            ref = ref.to(logp.dtype)
        offline = inputs.get("fastupg_offline")
        token_weight = inputs.get("fastupg_token_weight")
        est = self.fastupg_estimator
        s = self._fastupg_weights(mask, inputs, mode, gas)
        if token_weight is not None:
            s = s * token_weight
        loss, _ = policy_loss(logp, est, advantages=adv_tok, old_logp=old, mask=mask.bool(), offline=offline,
                              weight=s.to(logp.dtype), ref_logp=None if self._kl_outside else ref, agg="token-sum")
        if self._kl_outside:
            d = ref - logp
            kl = (torch.exp(d) - d - 1) * self._ratio(logp, old, mask)
            loss = loss + self.beta * (s.to(logp.dtype) * kl * mask).sum()
        # TRL's policy_loss metric: the aggregated policy (+ KL) loss before the accumulation scaling
        policy_value = loss.detach() * (gas if self.loss_type not in ("dapo", "cispo") else 1.0)
        if self._entropy_bonus_enabled:
            eff = mask if entropy_mask is None else mask * entropy_mask
            entropy_loss = (entropies * eff).sum() / eff.sum().clamp(min=1.0) / gas
            loss = loss - self.entropy_coef * entropy_loss
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_value).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

        metric_mask = mask if offline is None else mask * (~offline).to(mask.dtype)  # clip metrics: rollouts only
        self._log_trl_metrics(mode, logp.detach(), old, advantages, metric_mask, entropies.detach(), ref)
        return loss

    def _ratio(self, logp, old, mask):
        """TRL's coef_1: exp(l - old) per token, or GSPO's exp(sequence mean) broadcast; differentiable."""
        log_ratio = logp - old
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        return torch.exp(log_ratio)

    def _fastupg_weights(self, mask, inputs, mode, gas):
        if self.fastupg_preset is not None:
            return self._hybrid_weights(mask, inputs, gas)
        norm = None
        if self.loss_type in ("dapo", "cispo"):
            norm = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                norm = norm * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return trl_aggregation_weights(self.loss_type, mask, max_completion_length=self.max_completion_length,
                                       accumulation_steps=gas, dapo_normalizer=norm)

    @torch.no_grad()
    def _log_trl_metrics(self, mode, logp, old, advantages, mask, entropies, ref):
        """TRL 1.16's metrics, same names and definitions (GRPOTrainer._compute_loss, 'Log the metrics')."""
        coef_1 = self._ratio(logp, old, mask)

        def masked_seq_mean(x):
            if x.shape[1] == 1:
                return x.squeeze(1)
            return (x * mask).sum(-1) / mask.sum(-1)

        def global_masked_mean(x):
            if x.shape[1] == 1:
                local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
            else:
                local_sum, local_count = (x * mask).sum(), mask.sum().float()
            totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if ref is not None:
            d = ref - logp
            kl = torch.exp(d) - d - 1
            if self._kl_outside:
                kl = kl * coef_1
            self._metrics[mode]["kl"].append(global_masked_mean(kl))
        self._metrics[mode]["entropy"].append(global_masked_mean(entropies))
        if self.loss_type == "cispo" and self.fastupg_preset is None:
            clipped = (coef_1 > self.epsilon_high) & (advantages > 0)
            self._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(clipped.float()))
            return
        from trl.trainer.utils import nanmax, nanmin
        low = (coef_1 < 1 - self.epsilon_low) & (advantages < 0)
        high = (coef_1 > 1 + self.epsilon_high) & (advantages > 0)
        self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(low.float()))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(high.float()))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean((low | high).float()))
        self._metrics[mode]["clip_ratio/low_min"].append(
            nanmin(self.accelerator.gather(masked_seq_mean(low.float()))).item())
        self._metrics[mode]["clip_ratio/high_max"].append(
            nanmax(self.accelerator.gather(masked_seq_mean(high.float()))).item())

    # -- hybrid post-training (HPT / LUFFY / SRFT): demonstrations in the batch ---------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._fastupg_rewards_per_func = rewards_per_func  # (hybrid presets need each group's success rate)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.fastupg_preset is None or not self.model.training:
            return out
        return self._hybrid_rows(inputs, out)

    def _hybrid_rows(self, inputs, out):
        """Append, per prompt group, the dataset's demonstration as one more row marked offline, and replace TRL's
        advantages by the estimator's own (fastupg.routing.advantages: grpo / mixed / one per branch), with HPT's
        per-row alpha (rollouts) / beta (demonstration) weights from the group's success rate P = mean reward."""
        from fastupg.hpt import HPTConfig, route
        from fastupg.routing import advantages as fastupg_advantages
        G = self.num_generations
        dev = out["completion_ids"].device
        rpf = self._fastupg_rewards_per_func
        reward = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1).to(torch.float32).cpu()
        n_on = out["completion_ids"].size(0)
        if reward.numel() != n_on or n_on % G:
            raise NotImplementedError("hybrid presets: one process, whole groups per generation batch")
        if not bool(((reward >= 0) & (reward <= 1)).all()):
            raise ValueError("hybrid presets (HPT/LUFFY/SRFT) need rewards in [0, 1]: the group's mean reward is its "
                             "success rate P")
        n_groups = n_on // G
        tok = self.processing_class
        eos = tok.eos_token_id
        demos = []
        for g in range(n_groups):
            text = inputs[g * G][self.demonstration_column]
            ids = tok(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            demos.append(ids[: self.max_completion_length])
        Tc = max(out["completion_ids"].size(1), max(len(d) for d in demos))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0

        def widen(t, fill):
            return torch.nn.functional.pad(t, (0, Tc - t.size(1)), value=fill)

        demo_ids = torch.full((n_groups, Tc), pad, dtype=out["completion_ids"].dtype, device=dev)
        demo_mask = torch.zeros((n_groups, Tc), dtype=out["completion_mask"].dtype, device=dev)
        for g, d in enumerate(demos):
            demo_ids[g, : len(d)] = torch.tensor(d, dtype=demo_ids.dtype)
            demo_mask[g, : len(d)] = 1
        first = torch.arange(n_groups, device=dev) * G
        new = dict(out)
        new["prompt_ids"] = torch.cat([out["prompt_ids"], out["prompt_ids"][first]])
        new["prompt_mask"] = torch.cat([out["prompt_mask"], out["prompt_mask"][first]])
        new["completion_ids"] = torch.cat([widen(out["completion_ids"], pad), demo_ids])
        new["completion_mask"] = torch.cat([widen(out["completion_mask"], 0), demo_mask])
        for k in ("old_per_token_logps", "sampling_per_token_logps"):  # demonstrations use no behaviour log-probs
            if out.get(k) is not None:
                new[k] = torch.cat([widen(out[k], 0.0), out[k].new_zeros(n_groups, Tc)])
        if out.get("importance_sampling_ratio") is not None:
            r = out["importance_sampling_ratio"]
            new["importance_sampling_ratio"] = torch.cat([widen(r, 1.0) if r.size(1) > 1 else r,
                                                          r.new_ones(n_groups, r.size(1) if r.size(1) == 1 else Tc)])
        offline = torch.cat([torch.zeros(n_on, dtype=torch.bool), torch.ones(n_groups, dtype=torch.bool)])
        group = torch.cat([torch.arange(n_on) // G, torch.arange(n_groups)])
        reward_all = torch.cat([reward, torch.ones(n_groups)])  # a demonstration is a correct solution
        est = self.fastupg_estimator
        A = fastupg_advantages(est, reward_all, group, offline)
        weight = torch.ones(n_on + n_groups)
        if self.fastupg_preset == "hpt":
            P = reward.view(n_groups, G).mean(1)
            alpha, beta = route(P, HPTConfig(mode="switch", gate=self.fastupg_hpt_gate))
            weight = torch.where(offline, beta[group], alpha[group])
            self._metrics["train"]["hpt/sft_fraction"].append(float((beta > 0).float().mean()))
        new["advantages"] = A.to(dev)
        new["fastupg_offline"] = offline.to(dev)[:, None].expand(-1, Tc).contiguous()
        new["fastupg_token_weight"] = weight.to(dev, torch.float64)[:, None].expand(-1, Tc).contiguous()
        new["num_items_in_batch"] = new["completion_mask"].sum()
        return new

    def _hybrid_weights(self, mask, inputs, gas):
        """The preset's own aggregation over the micro-batch (padded length = max_completion_length), / accumulation."""
        from fastupg.estimator import aggregation_weights
        B, T = mask.shape
        seq = torch.arange(B, device=mask.device)[:, None].expand(B, T).reshape(-1)
        # rows of weight 0 (HPT's switch: rollouts of unsolved prompts, demonstrations of solved ones) do not count,
        # as fastupg's trainer drops them before the forward pass
        counted = mask.bool() & (inputs["fastupg_token_weight"] > 0)
        s = aggregation_weights(self.fastupg_estimator, counted.reshape(-1),
                                inputs["fastupg_offline"].reshape(-1), seq, padded_len=self.max_completion_length,
                                nseq=B)
        return (s / gas).view(B, T)


HYBRID_PRESETS = ("hpt", "luffy", "srft")


def _hybrid_estimator(preset: str, trainer) -> Estimator:
    """The fastupg preset, with TRL's epsilon / epsilon_high as its clip bounds."""
    if preset not in HYBRID_PRESETS:
        raise ValueError(f"fastupg_preset={preset!r} is not one of {list(HYBRID_PRESETS)}")
    a = trainer.args
    bad = [k for k, on in (("beta != 0 (demonstrations have no reference log-probs here)", trainer.beta != 0),
                           ("off_policy_mask_threshold", trainer.off_policy_mask_threshold is not None),
                           ("importance_sampling_level='sequence'", trainer.importance_sampling_level != "token"),
                           ("steps_per_generation > 1", a.steps_per_generation != 1),
                           ("num_processes > 1", trainer.accelerator.num_processes != 1)) if on]
    if bad:
        raise NotImplementedError(f"fastupg_preset={preset!r} on TRL does not support: {', '.join(bad)}")
    trainer.fastupg_hpt_gate = 0.0
    return Estimator.preset(preset, eps_low=float(trainer.epsilon_low), eps_high=float(trainer.epsilon_high))


class _fake_model:
    """Adapter so fastupg.models.hf_loss._head_params (DTensor gathering) can read a bare lm_head module."""

    def __init__(self, head):
        self._head = head

    def get_output_embeddings(self):
        return self._head


__all__ = ["FusedGRPOTrainer", "trl_estimator", "trl_aggregation_weights", "add_hidden_states_forward",
           "TRL_LOSS_TYPES"]
