"""The paper's comparison (arXiv 2509.04419, Tables 2-3 and 5, Figs. 6/8) at small scale on the embedded task.

    python scripts/reproduce.py                         # 6 methods x 3 seeds, default budget
    python scripts/reproduce.py --quick                 # smoke run: every method runs and logs (CI)
    python scripts/reproduce.py --methods hpt,sft --seeds 0,1,2 --steps 60 --out runs/reproduce
    python scripts/reproduce.py --ablations gate,mode,offpolicy   # + HPT gate gamma in {0, 1/8, 2/8}, switch vs
                                                                  #   soft, SFT vs off-policy RL on failed prompts

Every method runs with the same budget: the same number of optimizer steps (sft-then-grpo splits them
half/half between its stages), groups of the same size (8 rollouts per prompt; LUFFY/SRFT: 7 rollouts + the
demonstration, as in LUFFY), the same prompts per step (SFT sees as many demonstrations per step as the RL
methods see prompts), the same learning rate and seeds. Each run is trained in-process with
`fastupg.trainer.train`, then its final checkpoint is evaluated greedily on the held-out split per difficulty
level. Outputs under --out/<budget>/ (one folder per budget, e.g. runs/reproduce/quick-2steps-1a2b3c4d/, so a
--quick run and a full run never share anything): one folder per run (config.yaml, metrics.jsonl, result.json),
results.json, results.md (methods as rows, accuracy per level + average, mean +- std over seeds) and curves.png
(held-out accuracy and HPT's SFT fraction over steps). A run whose result.json holds the same spec (method,
seed, budget, overrides, recipe text) is skipped (resumable); one made with other settings is trained again.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METHODS = ("hpt", "sft", "grpo", "sft-then-grpo", "luffy", "srft")
CONFIG_OF = {"hpt": "hpt-paper", "sft": "sft", "grpo": "grpo", "sft-then-grpo": "sft-then-grpo",
             "luffy": "luffy", "srft": "srft"}
# ablation name -> (base method, overrides); Table 5's rows that the config can express
ABLATIONS = {
    # gamma = 0 and switch mode are the main `hpt` run itself: reported from it, not run again
    "gate": {"hpt-gate0": None, "hpt-gate1/8": {"hpt_gate": 0.125}, "hpt-gate2/8": {"hpt_gate": 0.25}},
    "mode": {"hpt-switch": None, "hpt-soft": {"hpt_mode": "soft"}},
    # Table 5: what replaces RL on the prompts the model fails: SFT (the main run) or off-policy RL (LUFFY's branch)
    "offpolicy": {"hpt-sft": None, "hpt-offpolicy": {"hpt_offline": "offpolicy"}},
}


def level_label(d: int) -> str:
    """Column name of a difficulty level in the table: "L2 (3 operands)"."""
    from fastupg.task.arith import LEVELS as ARITH_LEVELS, level_name
    return f"L{d} ({level_name(d)})" if d in ARITH_LEVELS else f"level{d}"


TASK_KEYS = ("model_size", "embedded_mix", "embedded_n_train", "embedded_base_steps")


def demo_recipe() -> dict:
    """configs/demo.yaml: the comparison runs on the demo's task, base, optimisation and sampling."""
    import yaml
    return yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())


_DEMO = demo_recipe()


def task_overrides() -> dict:
    """The embedded task and base model of the demo (configs/demo.yaml): every method starts from that base."""
    return {k: _DEMO[k] for k in TASK_KEYS if k in _DEMO}


@dataclass(frozen=True)
class Budget:
    """What every method shares. `prompts_per_step * group` completions per RL step."""
    steps: int = 120
    group: int = 8
    prompts_per_step: int = 8
    # the demo's optimisation and sampling, read from configs/demo.yaml (which says why; from the recipes'
    # temperature 1.0 and constant learning rate, RL barely moved the base: docs/reproduce.md)
    learning_rate: float = _DEMO["learning_rate"]
    adam_beta2: float = _DEMO["adam_beta2"]
    temperature: float = _DEMO["temperature"]
    lr_scheduler_type: str = _DEMO["lr_scheduler_type"]
    min_lr_ratio: float = _DEMO["min_lr_ratio"]
    max_completion_length: int = 40
    eval_every: int = 20          # held-out accuracy logged during training (for the curves)
    eval_samples: int = 100       # held-out prompts for the curves
    final_eval_samples: int = 300  # held-out prompts for the table (all levels, split per level)
    num_threads: int = 1
    base_steps: int = -1           # the embedded base's pretraining steps; -1: configs/demo.yaml's (the demo's base)

    def __post_init__(self):
        for k in ("steps", "group", "prompts_per_step", "max_completion_length", "eval_samples",
                  "final_eval_samples", "num_threads"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.group < 2:
            raise ValueError(f"group must be >= 2 (GRPO/HPT compare rollouts in a group), got {self.group}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")


QUICK = Budget(steps=2, group=4, prompts_per_step=2, max_completion_length=24, eval_every=1, eval_samples=8,
               final_eval_samples=24, base_steps=2)


def run_overrides(method: str, budget: Budget, seed: int, out: Path, extra: dict | None = None) -> tuple[str, dict]:
    """(recipe path, keyword overrides) for one run: the recipe's estimator settings, the shared budget."""
    base = method if method in CONFIG_OF else "hpt"
    cfg = REPO / "configs" / f"{CONFIG_OF[base]}.yaml"
    b = budget
    kw: dict = dict(seed=seed, output_dir=str(out), max_completion_length=b.max_completion_length,
                    learning_rate=b.learning_rate, eval_steps=b.eval_every, eval_samples=b.eval_samples,
                    save_steps=0, save_total_limit=1, report_to=("jsonl",), plot=False, progress_bar=False,
                    num_threads=b.num_threads, warmup_steps=min(10, max(0, b.steps // 10)),
                    adam_beta2=b.adam_beta2, temperature=b.temperature, lr_scheduler_type=b.lr_scheduler_type,
                    min_lr_ratio=b.min_lr_ratio, **task_overrides())
    if b.base_steps != -1:
        kw["embedded_base_steps"] = b.base_steps
    rl = dict(num_generations=b.group, per_device_train_batch_size=b.group * b.prompts_per_step)
    demo_in_group = dict(num_generations=b.group - 1, per_device_train_batch_size=(b.group - 1) * b.prompts_per_step)
    sft = dict(loss_type="sft", per_device_train_batch_size=b.prompts_per_step)
    if base == "sft":
        kw.update(max_steps=b.steps, per_device_train_batch_size=b.prompts_per_step)
    elif base in ("luffy", "srft"):
        kw.update(max_steps=b.steps, **demo_in_group)
    elif base == "sft-then-grpo":
        first = max(1, b.steps // 2)
        kw.update(stages=(dict(sft, max_steps=first),
                          dict(loss_type="grpo", max_steps=max(1, b.steps - first), **rl)))
    else:  # hpt, grpo
        kw.update(max_steps=b.steps, **rl)
    kw.update(extra or {})
    return str(cfg), kw


def _history(out: Path) -> list[dict]:
    """metrics.jsonl rows; a multi-stage run's stages are concatenated with steps offset."""
    files = sorted(out.glob("stage-*/metrics.jsonl"), key=lambda p: int(p.parent.name.split("-")[1]))
    files = files or [out / "metrics.jsonl"]
    rows, offset = [], 0
    for f in files:
        last = 0
        if f.is_file():
            for line in f.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    last = max(last, int(r["step"]))
                    rows.append(dict(r, step=int(r["step"]) + offset))
        offset += last
    return rows


def sft_fraction_ends(hist: list[dict]) -> dict:
    """HPT's SFT fraction at the start and at the end of a run: the mean over the first and over the last sixth of
    its logged steps (one step's fraction over 8 prompts moves in steps of 1/8: a single step is mostly noise);
    None for a method that does not route prompts."""
    xs = [r["hpt/sft_fraction"] for r in hist if "hpt/sft_fraction" in r]
    if not xs:
        return {"sft_fraction_start": None, "sft_fraction_end": None}
    w = max(1, len(xs) // 6)
    return {"sft_fraction_start": statistics.fmean(xs[:w]), "sft_fraction_end": statistics.fmean(xs[-w:])}


def eval_per_level(checkpoint: str, cfg, n: int) -> dict:
    """Greedy held-out accuracy of a checkpoint, overall and per difficulty level (the embedded eval file's
    `difficulty`), on the same number of prompts from every level (the first n // levels of each)."""
    import torch
    from transformers import AutoTokenizer
    from fastupg import distributed as D
    from fastupg.evaluate import example_levels, greedy_eval, level_key
    from fastupg.trainer import load_data, load_model, resolve_paths, reward_fn
    info = D.init()
    paths = resolve_paths(cfg, info)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    ex = load_data(paths.eval_file, tok, cfg, True, False)
    levels = example_levels(paths.eval_file, ex) or [0] * len(ex)
    per = max(1, n // len(set(levels)))
    keep = [i for lv in sorted(set(levels)) for i in [i for i, v in enumerate(levels) if v == lv][:per]]
    model = load_model(checkpoint, cfg, torch.device("cpu"))
    res = greedy_eval(model, tok, [ex[i] for i in keep], reward_fn(paths.reward),
                      cfg.eval_max_new_tokens or cfg.max_completion_length, cfg.eval_batch_size, info,
                      [levels[i] for i in keep])
    out = {level_label(lv): res[level_key(lv)] for lv in sorted(set(levels))}
    out["all"] = res["eval/accuracy"]
    out["n_eval"] = len(keep)
    return out


def ensure_base(budget: Budget, out: Path) -> tuple[str, object]:
    """Build the shared task data and base model once, before any run (parallel runs would each build it).
    Returns (the base model's folder, a config of the task) for evaluating the base itself."""
    from fastupg import distributed as D
    from fastupg.config import load_config
    from fastupg.trainer import resolve_paths
    import torch
    torch.set_num_threads(budget.num_threads)   # as the runs: the tiny model's ops are too small for 2 threads
    path, kw = run_overrides("sft", budget, 0, out / "base-check")
    t = time.time()
    cfg = load_config(path, (), **kw)
    paths = resolve_paths(cfg, D.init())
    print(f"[reproduce] base model: {paths.model} ({time.time() - t:.0f}s)", flush=True)
    return paths.model, cfg


def budget_dir(out: Path, budget: Budget) -> Path:
    """One folder per budget under --out: a --quick run and a full run (or two --steps) never share run folders."""
    import dataclasses
    import hashlib
    h = hashlib.sha1(json.dumps(dataclasses.asdict(budget), sort_keys=True).encode()).hexdigest()[:8]
    return Path(out) / f"{'quick' if budget == QUICK else 'budget'}-{budget.steps}steps-{h}"


def run_spec(method: str, seed: int, budget: Budget, extra: dict | None, recipe: str, kw: dict) -> dict:
    """Everything a run's result depends on that this script chooses; a stored result is reused only when
    its spec is the same (the recipe file's text included)."""
    import dataclasses
    import hashlib
    spec = {"method": method, "seed": seed, "budget": dataclasses.asdict(budget), "extra": extra or {},
            "recipe": Path(recipe).name, "recipe_sha1": hashlib.sha1(Path(recipe).read_bytes()).hexdigest(),
            "overrides": {k: v for k, v in kw.items() if k not in ("output_dir", "resume")}}
    return json.loads(json.dumps(spec, default=list))


def run_one(method: str, seed: int, budget: Budget, out: Path, extra: dict | None = None) -> dict:
    """Train one (method, seed) and evaluate it; result.json makes it skippable next time (same spec only)."""
    res_file = out / "result.json"
    path, kw = run_overrides(method, budget, seed, out, extra)
    spec = run_spec(method, seed, budget, extra, path, kw)
    if res_file.is_file():
        old = json.loads(res_file.read_text())
        if old.get("spec") == spec:
            return dict(old, **sft_fraction_ends(_history(out)))   # recomputed: the stored ends may predate the window
        print(f"[reproduce] {out}: result.json was made with other settings; training this run again", flush=True)
        import shutil
        shutil.rmtree(out)
    from fastupg.config import load_config
    from fastupg.trainer import train
    # a run killed mid-way (no result.json) continues from its Ctrl-C checkpoint, or starts afresh without one
    kw["resume"] = True
    cfg = load_config(path, (), **kw)
    out.mkdir(parents=True, exist_ok=True)
    import yaml
    (out / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict(), default=list))))
    t0 = time.time()
    summary = train(cfg, log=lambda *a, **k: None)
    train_s = time.time() - t0
    # per-level evaluation needs the last stage's settings (model size, data, lengths)
    last_cfg = cfg.stage_configs()[-1] if cfg.stages else cfg
    import dataclasses
    last_cfg = dataclasses.replace(last_cfg, output_dir=str(out))
    levels = eval_per_level(summary["final_checkpoint"], last_cfg, budget.final_eval_samples)
    hist = _history(out)
    result = {"spec": spec, "method": method, "seed": seed, "steps": max((r["step"] for r in hist), default=0),
              "train_seconds": round(train_s, 1), "accuracy": levels, **sft_fraction_ends(hist),
              "overrides": {k: v for k, v in kw.items() if k != "output_dir"}}
    res_file.write_text(json.dumps(result, indent=2, default=list))
    _prune_checkpoints(out)
    return result


def _prune_checkpoints(out: Path) -> None:
    """The table needs only result.json and metrics; checkpoints would pile up over many runs."""
    import shutil
    for d in list(out.glob("checkpoint-*")) + list(out.glob("stage-*/checkpoint-*")):
        shutil.rmtree(d, ignore_errors=True)


def _run_spec(spec):  # top-level for the process pool
    method, seed, budget, out, extra = spec
    return run_one(method, seed, budget, Path(out), extra)


def mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(results: list[dict]) -> dict:
    """method -> {level: (mean, std)} over seeds, plus seeds and SFT fractions."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["method"], []).append(r)
    table = {}
    for m, rs in by.items():
        cols = level_columns(rs[0]["accuracy"]) + ["all"]
        row = {c: mean_std([r["accuracy"][c] for r in rs]) for c in cols}
        row["seeds"] = sorted(r["seed"] for r in rs)
        fr = [r["sft_fraction_end"] for r in rs if r.get("sft_fraction_end") is not None]
        f0 = [r["sft_fraction_start"] for r in rs if r.get("sft_fraction_start") is not None]
        row["sft_fraction_start"] = mean_std(f0) if f0 else None
        row["sft_fraction_end"] = mean_std(fr) if fr else None
        row["train_seconds"] = mean_std([r["train_seconds"] for r in rs])
        table[m] = row
    return table


def level_columns(acc: dict) -> list[str]:
    """The per-level keys of one run's accuracy dict, in its order (eval_per_level writes them in level order)."""
    return [k for k in acc if k not in ("all", "n_eval")]


def to_markdown(table: dict, order: list[str]) -> str:
    first = next(iter(table.values()), {})
    cols = [k for k in first if k not in ("all", "seeds", "sft_fraction_start", "sft_fraction_end",
                                          "train_seconds")] + ["all"]
    head = "| method | " + " | ".join(("avg" if c == "all" else c) for c in cols) + \
        " | SFT fraction start -> end | seeds | train s/run |"
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    fmt = lambda ms: "-" if ms is None or math.isnan(ms[0]) else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"
    for m in order:
        if m not in table:
            continue
        r = table[m]
        sf = "-" if r["sft_fraction_start"] is None else \
            f"{r['sft_fraction_start'][0]:.2f} -> {r['sft_fraction_end'][0]:.2f}"
        lines.append(f"| {m} | " + " | ".join(fmt(r.get(c)) for c in cols) +
                     f" | {sf} | {len(r['seeds'])} | {r['train_seconds'][0]:.0f} |")
    return "\n".join(lines) + ("\n\n(held-out greedy accuracy in %, mean ± std over seeds; SFT fraction: HPT's, "
                               "mean over the first and the last sixth of the steps, mean over seeds)\n")


def plot(runs: dict[str, list[Path]], path: Path) -> Path | None:
    """Held-out accuracy (overall and per level) and HPT's SFT fraction over steps, mean over seeds per method
    (the step-0 point is the shared base); the SFT fraction smoothed (EMA), its raw mean faint."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fastupg.metrics import smooth
    keys = sorted({k for dirs in runs.values() for d in dirs for r in _history(d) for k in r
                   if k.startswith("eval/accuracy")}, key=lambda k: (k != "eval/accuracy", k))
    keys.append("hpt/sft_fraction")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4), squeeze=False)
    # names that report the same runs (hpt-gate0 = hpt-switch = hpt-sft) are one curve with one label
    same: dict[tuple, list[str]] = {}
    for m, dirs in runs.items():
        same.setdefault(tuple(dirs), []).append(m)
    runs = {" = ".join(names): list(dirs) for dirs, names in same.items()}
    # one color per curve in every panel (left to matplotlib, the SFT-fraction panel's two lines per curve would
    # shift its colors against the accuracy panels)
    palette = plt.get_cmap("tab10").colors
    colors = {m: palette[i % len(palette)] for i, m in enumerate(runs)}
    for m, dirs in runs.items():
        for ax, key in zip(axes[0], keys):
            curves = [{r["step"]: r[key] for r in _history(d) if key in r} for d in dirs]
            curves = [c for c in curves if c]
            if not curves:
                continue
            steps = sorted(set().union(*curves))
            ys = [statistics.fmean([c[s] for c in curves if s in c]) for s in steps]
            color = colors.get(m)
            if key == "hpt/sft_fraction":
                ax.plot(steps, ys, color=color, alpha=0.2, lw=0.8)
                ax.plot(steps, smooth(ys, max(3.0, len(steps) / 10)), color=color, lw=2, label=m)
            else:
                ax.plot(steps, ys, "o-", color=color, label=m, markersize=3, lw=1.4)
    for ax, key in zip(axes[0], keys):
        if key == "hpt/sft_fraction":
            title = "HPT: fraction of prompts trained by SFT (EMA)"
        elif key == "eval/accuracy":
            title = "held-out greedy accuracy, all levels"
        else:
            lv = key.rsplit("level", 1)[1]
            title = f"held-out accuracy, {level_label(int(lv)) if lv.isdigit() else key}"
        ax.set(title=title, xlabel="optimizer step", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def parse_list(s: str, kind=str) -> list:
    return [kind(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)}")
    p.add_argument("--seeds", default=None, help="comma list (default 0,1,2; --quick: 0)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (same for every method)")
    p.add_argument("--out", default="runs/reproduce", help="output folder (re-running skips finished runs)")
    p.add_argument("--ablations", default="", help=f"comma list from {','.join(ABLATIONS)} (HPT variants)")
    p.add_argument("--ablation-seeds", default=None, help="seeds for the ablations (default: --seeds)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: every method runs and logs")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (separate processes)")
    p.add_argument("--lr", type=float, default=None, help="learning rate shared by every method")
    p.add_argument("--eval-every", type=int, default=None)
    args = p.parse_args(argv)

    methods = parse_list(args.methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    abl = parse_list(args.ablations)
    bad = [a for a in abl if a not in ABLATIONS]
    if bad:
        raise ValueError(f"--ablations: unknown {bad}; choose from {list(ABLATIONS)}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    budget = QUICK if args.quick else Budget()
    import dataclasses
    repl = {k: v for k, v in (("steps", args.steps), ("learning_rate", args.lr), ("eval_every", args.eval_every))
            if v is not None}
    budget = dataclasses.replace(budget, **repl)
    seeds = parse_list(args.seeds, int) if args.seeds else [0] if args.quick else [0, 1, 2]
    aseeds = parse_list(args.ablation_seeds, int) if args.ablation_seeds else seeds
    out = budget_dir(Path(args.out), budget)
    out.mkdir(parents=True, exist_ok=True)

    specs = [(m, s, budget, str(out / m / f"seed{s}"), None) for m in methods for s in seeds]
    for a in abl:
        for name, extra in ABLATIONS[a].items():
            if extra is None:  # = the main hpt run (same budget, seeds); run it if --methods left it out
                specs += [(name, s, budget, str(out / "hpt" / f"seed{s}"), None) for s in aseeds]
                continue
            specs += [(name, s, budget, str(out / "ablations" / name.replace("/", "_") / f"seed{s}"), extra)
                      for s in aseeds]
    print(f"[reproduce] {len(specs)} runs, budget {budget}, in {out}", flush=True)
    t0 = time.time()
    base_model, base_cfg = ensure_base(budget, out)

    def done(i, n, r):
        a = r["accuracy"]
        print(f"[reproduce] {i}/{n} {r['method']} seed {r['seed']}: avg {a['all']:.3f} "
              + " ".join(f"{k} {a[k]:.3f}" for k in level_columns(a))
              + (f" sft_frac {r['sft_fraction_start']:.2f}->{r['sft_fraction_end']:.2f}"
                 if r.get("sft_fraction_end") is not None else "")
              + f" ({r['train_seconds']:.0f}s train, {time.time() - t0:.0f}s total)", flush=True)

    # a folder is trained once even when several rows report it (hpt-gate0 = hpt-switch = hpt)
    first: dict = {}
    for sp in specs:
        first.setdefault(sp[3], sp)
    unique = list(first.values())
    by_dir: dict[str, dict] = {}
    if args.jobs == 1:
        for i, sp in enumerate(unique, 1):
            by_dir[sp[3]] = r = _run_spec(sp)
            done(i, len(unique), r)
    else:
        import multiprocessing as mp
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
            for i, (sp, r) in enumerate(zip(unique, ex.map(_run_spec, unique)), 1):
                by_dir[sp[3]] = r
                done(i, len(unique), r)
    results = [dict(by_dir[sp[3]], method=sp[0]) for sp in specs]
    # the shared starting point, on the same held-out prompts: the row every method is measured against
    base_row = {"method": "base", "seed": 0, "train_seconds": 0.0,
                "accuracy": eval_per_level(base_model, base_cfg, budget.final_eval_samples)}

    table = summarize([base_row] + results)
    order = ["base"] + list(methods) + [n for a in abl for n in ABLATIONS[a]]
    md = to_markdown(table, order)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"budget": dataclasses.asdict(budget), "seeds": seeds,
                                                  "table": table, "runs": results}, indent=2, default=list))
    dirs: dict[str, list[Path]] = {}
    for sp in specs:
        if sp[0] in methods:
            dirs.setdefault(sp[0], []).append(Path(sp[3]))
    png = plot(dirs, out / "curves.png")
    if abl:
        adirs: dict[str, list[Path]] = {}
        for sp in specs:
            if sp[0] not in methods:
                adirs.setdefault(sp[0], []).append(Path(sp[3]))
        plot(adirs, out / "ablations.png")
    print(md)
    print(f"[reproduce] wrote {out / 'results.md'}, {out / 'results.json'}, {png}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:  # a bad argument: one line and exit 2, like the fastupg CLI
        print(f"reproduce.py: error: {e}", file=sys.stderr)
        sys.exit(2)
