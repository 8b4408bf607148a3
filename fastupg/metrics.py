"""Run logging: console, JSONL, TensorBoard, W&B (when configured and installed), and a PNG plot.

Metric names follow TRL's GRPOTrainer where TRL has one (reward, reward_std, entropy,
clip_ratio/low_mean, clip_ratio/high_mean, completions/mean_length, completions/clipped_ratio,
kl, loss, grad_norm, learning_rate), plus hpt/sft_fraction and eval/accuracy.
Only rank 0 creates a logger that writes anything.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

CONSOLE_KEYS = ("loss", "reward", "hpt/sft_fraction", "eval/accuracy", "grad_norm", "learning_rate",
                "completions/mean_length", "tokens_per_s")


class RunLogger:
    def __init__(self, output_dir, report_to=("jsonl",), run_name: str | None = None, config: dict | None = None,
                 wandb_project: str | None = None, enabled: bool = True, console=print,
                 resume_step: int | None = None):
        """`resume_step`: None for a fresh run (metrics.jsonl starts empty); the checkpoint's step on resume:
        rows after it (logged by the interrupted or rewound run) are dropped from metrics.jsonl and hidden
        from TensorBoard (purge_step), so no step is ever logged twice."""
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.console = console
        self.history: list[dict] = []
        self._jsonl = self._tb = self._wandb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if "jsonl" in report_to:
            path = self.dir / "metrics.jsonl"
            if resume_step is not None and path.is_file():
                keep = [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step]
                tmp = path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
                os.replace(tmp, path)
            self._jsonl = open(path, "a" if resume_step is not None else "w", encoding="utf-8")
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
                purge = 0 if resume_step is None else resume_step + 1  # hides a previous writer's later steps
                self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"), purge_step=purge)
            except ImportError as e:  # pragma: no cover
                console(f"[fastupg] tensorboard not available ({e}); not logging to it")
        if "wandb" in report_to:
            try:
                import wandb
                self._wandb = wandb.init(project=wandb_project or "fastupg", name=run_name, config=config,
                                         dir=str(self.dir))
            except ImportError:
                console("[fastupg] report_to has 'wandb' but wandb is not installed; skipping it")

    def log(self, step: int, metrics: dict, print_console: bool = True) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        if self._jsonl:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), step)
        if self._wandb:
            self._wandb.log(dict(metrics), step=step)
        if print_console and self.console:
            parts = [f"{k}={_fmt(row[k])}" for k in CONSOLE_KEYS if k in row]
            self.console(f"step {step}: " + " ".join(parts))

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None
        if self._tb:
            self._tb.close()
            self._tb = None
        if self._wandb:
            self._wandb.finish()
            self._wandb = None


def step_metrics(acc: dict, rows, stats: dict, *, est, cfg, info, n_prompts: int, n_kept: int,
                 grad_norm, lr: float, dt: float, t_gen: float, use_is: bool, has_ref: bool) -> dict:
    """One step's metrics (TRL's names), reduced over ranks: sums and counts are all-reduced, then divided.
    acc: the loss passes' sums (fastupg.step_loss); rows: the step's rows before dropping; stats: the rollouts'
    (len_sum, trunc_sum, n_gen) and the routing's (per-prompt P and beta)."""
    import torch

    from fastupg import distributed as D
    on = ~rows.offline
    r_on = rows.reward[on]
    grp_std = _group_std(r_on, rows.group[on])
    P, beta = stats["P"], stats["beta"]
    vals = {
        "loss": acc.get("loss", 0.0), "reward_sum": float(r_on.sum()), "n_on_rows": float(on.sum()),
        "reward_std_sum": float(grp_std.sum()), "n_groups": float(len(grp_std)),
        "clip_low": acc.get("clip_low", 0.0), "clip_high": acc.get("clip_high", 0.0), "n_on": acc.get("n_on", 0.0),
        "ent": acc.get("ent", 0.0), "kl": acc.get("kl", 0.0), "ntok": acc.get("ntok", 0.0),
        "packed": acc.get("packed", 0.0), "len_sum": stats.get("len_sum", 0.0),
        "trunc_sum": stats.get("trunc_sum", 0.0), "n_gen": stats.get("n_gen", 0.0),
        "sft_prompts": float((beta > 0).sum()) if est.offline is not None and cfg.loss_type == "hpt" else 0.0,
        "n_prompts": float(n_prompts), "rows": float(len(rows.ids)), "kept": float(n_kept),
        "P_solved": float((P > 0).sum()) if est.online is not None else 0.0,
        **{k: acc.get(k, 0.0) for k in ("is_ratio_sum", "is_clipped", "is_tokens", "is_logp_diff_sum")},
    }
    names = list(vals)
    tot = D.all_reduce_sum(torch.tensor([vals[k] for k in names], dtype=torch.float64), info)
    v = dict(zip(names, tot.tolist()))
    d = lambda a, b: v[a] / v[b] if v[b] else 0.0  # noqa: E731
    m = {"loss": v["loss"], "grad_norm": float(grad_norm), "learning_rate": lr,
         "tokens/trained": v["packed"], "tokens_per_s": (v["packed"] + v["len_sum"]) / max(dt, 1e-9),
         "time/step_s": dt, "time/rollout_s": t_gen, "rows/kept_fraction": d("kept", "rows")}
    if est.online is not None:
        m.update({"reward": d("reward_sum", "n_on_rows"), "reward_std": d("reward_std_sum", "n_groups"),
                  "completions/mean_length": d("len_sum", "n_gen"),
                  "completions/clipped_ratio": d("trunc_sum", "n_gen"),
                  "clip_ratio/low_mean": d("clip_low", "n_on"), "clip_ratio/high_mean": d("clip_high", "n_on"),
                  "frac_prompts_solved": d("P_solved", "n_prompts")})
    if use_is and v["is_tokens"]:  # TRL's names; means over the trained rollout tokens
        m.update({"sampling/importance_sampling_ratio/mean": d("is_ratio_sum", "is_tokens"),
                  "sampling/importance_sampling_ratio/clipped_fraction": d("is_clipped", "is_tokens"),
                  "sampling/sampling_logp_difference/mean": d("is_logp_diff_sum", "is_tokens")})
    if cfg.loss_type == "hpt":
        m["hpt/sft_fraction"] = d("sft_prompts", "n_prompts")
    m["entropy"] = d("ent", "ntok")
    if has_ref:
        m["kl"] = d("kl", "ntok")
    return m


def _group_std(r, g):
    """Std of the reward within each group (TRL's reward_std is its mean over groups)."""
    import torch
    if r.numel() == 0:
        return r.new_zeros(0)
    out = []
    for k in torch.unique(g):
        x = r[g == k]
        out.append(x.std() if x.numel() > 1 else x.new_zeros(()))
    return torch.stack(out)


def _fmt(v: float) -> str:
    if v == 0 or (1e-3 <= abs(v) < 1e4):
        return f"{v:.4g}"
    return f"{v:.3e}"


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def smooth(y: list[float], span: float) -> list[float]:
    """Exponential moving average with the pandas `span` convention (alpha = 2 / (span + 1)), debiased at the
    start (so the first points are not pulled towards 0)."""
    alpha = 2.0 / (max(span, 1.0) + 1.0)
    out, m, w = [], 0.0, 0.0
    for v in y:
        m = (1 - alpha) * m + alpha * v
        w = (1 - alpha) * w + alpha
        out.append(m / w)
    return out


def plot_run(history: list[dict], path, title: str = "fastupg run", level_names: dict | None = None) -> Path:
    """One PNG read at a glance (matplotlib Agg backend). Left: held-out greedy accuracy at each evaluation,
    overall (thick) and per difficulty level (eval/accuracy/level<d>), the points marked. Right: the training
    signals per step, smoothed (EMA, raw values faint behind): train reward and HPT's SFT fraction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["step"], r[key]) for r in history if key in r and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    if level_names is None:  # the embedded task's levels
        from fastupg.task.arith import LEVELS, level_name
        level_names = {d: level_name(d) for d in LEVELS}
    levels = sorted({k[len("eval/accuracy/level"):] for r in history for k in r
                     if k.startswith("eval/accuracy/level")}, key=lambda v: (len(v), v))
    fig, (ax_eval, ax_train) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = plt.get_cmap("viridis")
    for i, lv in enumerate(levels):
        x, y = series(f"eval/accuracy/level{lv}")
        name = level_names.get(int(lv), "") if lv.isdigit() else ""
        ax_eval.plot(x, y, "o-", color=colors(0.15 + 0.7 * i / max(1, len(levels) - 1)), lw=1.3, markersize=4,
                     label=f"level {lv}" + (f" ({name})" if name else ""))
    x, y = series("eval/accuracy")
    if x:
        ax_eval.plot(x, y, "o-", color="black", lw=2.4, markersize=6, label="all held-out prompts", zorder=5)
        ax_eval.annotate(f"{y[0]:.2f}", (x[0], y[0]), textcoords="offset points", xytext=(-4, 6), ha="right")
        ax_eval.annotate(f"{y[-1]:.2f}", (x[-1], y[-1]), textcoords="offset points", xytext=(4, 6), ha="left")
    ax_eval.set(title="held-out greedy accuracy (each evaluation marked)", xlabel="optimizer step",
                ylabel="accuracy", ylim=(-0.02, 1.05))

    steps = [r["step"] for r in history if "loss" in r]
    span = max(3.0, len(steps) / 10)
    for key, label, color in (("reward", "train reward (mean over rollouts)", "tab:blue"),
                              ("hpt/sft_fraction", "HPT: fraction of prompts trained by SFT", "tab:red")):
        x, y = series(key)
        if not x:
            continue
        ax_train.plot(x, y, color=color, alpha=0.18, lw=0.8)
        ax_train.plot(x, smooth(y, span), color=color, lw=2.2, label=label)
    ax_train.set(title=f"training signals per step (EMA, span {span:.0f} steps; raw faint)",
                 xlabel="optimizer step", ylim=(-0.02, 1.05))
    for ax in (ax_eval, ax_train):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
