"""One HPT optimizer step on long micro-batches: peak GPU memory and tokens/s, fastupg vs the peers.

    python benchmarks/bench_long_context.py --out benchmarks/results/long_context_h100.json     # GPU (~3-4 min)
    python benchmarks/bench_long_context.py --quick                                               # CPU smoke (CI)

The step (rollouts given): the model body with gradient checkpointing -> per-token log-probs of the response tokens
-> the HPT loss (fastupg.policy_loss, preset 'hpt': GRPO on rollouts, SFT on demonstration rows) -> backward -> AdamW
step. The model is randomly initialised from Qwen2.5-1.5B's configuration (built in this script, nothing downloaded),
bf16 parameters, sdpa attention (no flash-attn needed). Three ways to get the log-probs / loss, same model, same rows:

  fastupg   fastupg.trainer.token_logps: hidden states -> fastupg.models.hf_loss (fused linear log-softmax, chunked
            impl, response positions only): the N x V logits never exist
  hf        model(input_ids).logits -> log_softmax (the plain Hugging Face path: N x V logits of every position)
  liger     hidden states -> liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss (its own GRPO loss, one advantage per
            row; skipped when liger-kernel is not installed). Same work, not the same estimator: it measures cost.

A micro-batch of S tokens is S / R rows of R = min(S, 8192) tokens each (1024 prompt + the rest response; every 8th
row a demonstration), run as a (S / R, R) batch: equal-length rows need no attention mask, so sdpa runs its causal
kernel (a packed (1, S) row with restarting position ids would make sdpa build an S x S mask without flash-attn).

Every (method, size) runs in its own try/except: an out-of-memory error is recorded as "OOM" and memory is freed
before the next one. The table shows peak memory (GiB, torch.cuda.max_memory_allocated over the step, model and
optimizer state included) and tokens/s (S / median step time over --repeat timed steps after --warmup), then the
longest micro-batch each method fits. --out writes all of it as JSON with the device and versions.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Qwen/Qwen2.5-1.5B's config.json (shapes and RoPE); written out so nothing is downloaded
QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", sliding_window=None,
                  use_sliding_window=False)
QUICK = dict(QWEN25_15B, vocab_size=3001, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
SIZES = (8192, 16384, 32768, 65536, 131072)
QUICK_SIZES = (256, 512)
METHODS = ("fastupg", "hf", "liger")
PROMPT = 1024


def build_model(cfg_dict: dict, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(**cfg_dict)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # build directly in bf16 (no fp32 copy of 1.5 B parameters first)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


class Rows:
    """S tokens as (B, R) rows of rollouts and demonstrations, with everything the HPT loss needs."""

    def __init__(self, S: int, V: int, device, prompt: int, seed: int = 0):
        R = min(S, 8192)
        if S % R:
            raise ValueError(f"micro-batch size {S} must be a multiple of {R}")
        B = S // R
        self.S, self.B, self.R = S, B, R
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, V, (B, R + 1), generator=g)
        self.input_ids = ids[:, :-1].to(device)
        self.targets = ids[:, 1:].contiguous().to(device)
        p = min(prompt, R // 8)
        self.mask = torch.zeros(B, R, dtype=torch.bool, device=device)
        self.mask[:, p - 1:] = True                                      # targets of the response tokens
        self.offline_row = torch.tensor([(b % 8 == 7) for b in range(B)], device=device)
        self.adv_row = torch.randn(B, generator=g).to(device)
        self.adv_row[self.offline_row] = 1.0
        self.n_resp = int(self.mask.sum())
        # flat per-token inputs of the response tokens (row-major, as hf_loss's select returns them)
        row_of = torch.arange(B, device=device)[:, None].expand(B, R)[self.mask]
        self.seq_ids = row_of
        self.adv = self.adv_row[row_of]
        self.offline = self.offline_row[row_of]
        self.weight = torch.full((self.n_resp,), 1.0 / self.n_resp, device=device)   # token-mean over the batch


def hpt_loss(logp, ent, rows: Rows):
    from fastupg.estimator import Estimator, policy_loss
    est = Estimator.preset("hpt")
    loss, _ = policy_loss(logp.float(), est, advantages=rows.adv, old_logp=logp.detach().float(),
                          offline=rows.offline, seq_ids=rows.seq_ids, weight=rows.weight,
                          entropy=None if ent is None else ent.float(), agg="token-sum")
    return loss


def loss_fastupg(model, rows: Rows, chunk_mb: int):
    from fastupg.models.hf_loss import causal_lm_logprobs
    logp, ent = causal_lm_logprobs(model, rows.input_ids, rows.targets, select=rows.mask, return_entropy=True,
                                   impl="chunked", chunk_bytes=chunk_mb * 2 ** 20)
    return hpt_loss(logp, ent, rows)


def loss_hf(model, rows: Rows, chunk_mb: int):
    logits = model(input_ids=rows.input_ids, use_cache=False).logits
    lp = torch.log_softmax(logits.float(), dim=-1)
    logp = lp.gather(-1, rows.targets[..., None])[..., 0][rows.mask]
    ent = -(lp.exp() * lp).sum(-1)[rows.mask]
    return hpt_loss(logp, ent, rows)


def loss_liger(model, rows: Rows, chunk_mb: int):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    h = model.model(input_ids=rows.input_ids, use_cache=False).last_hidden_state
    fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo")
    w = model.get_output_embeddings().weight
    out = fn(h, w, rows.targets, rows.mask.long(), rows.adv_row.float(), old_per_token_logps=None)
    return out[0] if isinstance(out, tuple) else out


LOSSES = {"fastupg": loss_fastupg, "hf": loss_hf, "liger": loss_liger}


def liger_available() -> bool:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_one(model, method: str, S: int, args, device) -> dict:
    """warmup + repeat optimizer steps of one method at one size; {'status': 'ok'|'OOM'|'error', ...}."""
    fn = LOSSES[method]
    opt = None
    rows = None
    try:
        rows = Rows(S, model.config.vocab_size, device, prompt=args.prompt)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for it in range(args.warmup + args.repeat):
            _sync(device)
            t0 = time.perf_counter()
            loss = fn(model, rows, args.chunk_mb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if it >= args.warmup:
                times.append(time.perf_counter() - t0)
            if not torch.isfinite(loss.detach()).all():
                raise FloatingPointError(f"non-finite loss {float(loss)}")
        t = statistics.median(times)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
        return {"status": "ok", "peak_gib": peak, "step_s": t, "tokens_per_s": S / t, "times_s": times,
                "rows": rows.B, "row_len": rows.R, "response_tokens": rows.n_resp}
    except Exception as e:  # noqa: BLE001 - one size failing must not stop the others
        status = "OOM" if is_oom(e) else "error"
        return {"status": status, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    finally:
        for p in model.parameters():
            p.grad = None
        del opt, rows
        _free(device)


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "liger_kernel", "triton"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001
            try:
                from importlib.metadata import version
                out[name] = version(name.replace("_", "-"))
            except Exception:  # noqa: BLE001
                out[name] = None
    return out


def table(results: dict, sizes, methods) -> str:
    def cell(r):
        if r is None:
            return "skipped"
        if r["status"] != "ok":
            return r["status"]
        mem = "n/a" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.1f} GiB"
        return f"{mem}, {r['tokens_per_s']:,.0f} tok/s"
    w = 28
    lines = [f"{'tokens':>8} | " + " | ".join(f"{m:^{w}}" for m in methods)]
    lines.append("-" * len(lines[0]))
    for S in sizes:
        lines.append(f"{S:>8} | " + " | ".join(f"{cell(results[m].get(str(S))):^{w}}" for m in methods))
    lines.append("")
    for m in methods:
        ok = [S for S in sizes if (results[m].get(str(S)) or {}).get("status") == "ok"]
        lines.append(f"longest micro-batch that fits, {m}: {max(ok) if ok else 'none'}"
                     + ("" if results[m] else " (not run: not importable)"))
    # the issue's goal, stated against what ran: fastupg's longest fit vs the others', speed where both ran
    best = {m: max([S for S in sizes if (results[m].get(str(S)) or {}).get("status") == "ok"], default=0)
            for m in methods}
    if "fastupg" in results:
        for m in methods:
            if m == "fastupg" or not results[m]:
                continue
            common = [S for S in sizes if all((results[k].get(str(S)) or {}).get("status") == "ok"
                                               for k in ("fastupg", m))]
            ratios = ", ".join(f"{S}: {results['fastupg'][str(S)]['tokens_per_s'] / results[m][str(S)]['tokens_per_s']:.2f}x"
                               for S in common)
            factor = f" ({best['fastupg'] / best[m]:.0f}x)" if best[m] else ""
            lines.append(f"fastupg vs {m}: longest fit {best['fastupg']} vs {best[m]}{factor}; "
                         f"fastupg tokens/s / {m} tokens/s where both fit: {ratios or 'none'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny config, a few hundred tokens")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help=f"micro-batch sizes (default {SIZES})")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--chunk-mb", type=int, default=1024, help="fastupg loss chunk (MiB of fp32 logits)")
    ap.add_argument("--prompt", type=int, default=PROMPT, help="prompt tokens per row (no loss on them)")
    ap.add_argument("--device", default=None, help="default: cuda if available (required unless --quick)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    if device.type != "cuda" and not args.quick:
        print("bench_long_context: needs a CUDA GPU (or --quick for the CPU smoke run)", file=sys.stderr)
        return 2
    cfg = QUICK if args.quick else QWEN25_15B
    sizes = tuple(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else SIZES)
    if args.quick:
        args.prompt = min(args.prompt, 32)
        args.chunk_mb = 1
        args.warmup, args.repeat = 0, 1
    dtype = torch.float32 if args.quick else torch.bfloat16   # CPU smoke run: fp32 (bf16 matmuls are slow on CPU)
    methods = [m for m in args.methods if m != "liger" or liger_available()]
    skipped = [m for m in args.methods if m not in methods]

    model = build_model(cfg, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"bench_long_context: {n_params / 1e9:.3f} B params ({'tiny --quick config' if args.quick else 'Qwen2.5-1.5B config'}), "
          f"{str(dtype).replace('torch.', '')}, sdpa, gradient checkpointing, AdamW; device {dev_name}; warmup {args.warmup}, repeat {args.repeat}")
    if skipped:
        print(f"skipped (not importable): {', '.join(skipped)}")
    results: dict = {m: {} for m in args.methods}
    t_all = time.perf_counter()
    for S in sizes:
        for m in methods:
            r = run_one(model, m, S, args, device)
            results[m][str(S)] = r
            desc = (f"{r['peak_gib']:.2f} GiB, {r['tokens_per_s']:,.0f} tok/s, step {r['step_s']:.2f} s"
                    if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}")
            print(f"  {m:8s} {S:>7} tokens: {desc}", flush=True)
    print()
    print(table(results, sizes, args.methods))
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    if args.out:
        out = {"device": dev_name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "versions": versions(),
               "config": cfg, "dtype": str(dtype).replace("torch.", ""), "attn": "sdpa", "gradient_checkpointing": True,
               "sizes": list(sizes), "warmup": args.warmup, "repeat": args.repeat, "chunk_mb": args.chunk_mb,
               "skipped": skipped, "results": results,
               "longest_fit": {m: max([S for S in sizes if (results[m].get(str(S)) or {}).get("status") == "ok"],
                                      default=None) for m in args.methods}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")
    errors = [(m, S) for m in methods for S, r in results[m].items() if r["status"] == "error"]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
