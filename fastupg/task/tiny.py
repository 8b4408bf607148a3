"""A tokenizer and a randomly initialised tiny model, made locally, saved like a real checkpoint.

- Tokenizer: byte-level with NO merges (``tokenizers`` BPE over the 256 byte symbols) plus a
  few special tokens: every ASCII character, each digit included, is exactly one token, and any
  text at all (MATH-500 questions, emoji) still encodes, as one token per UTF-8 byte. Vocab 262.
- Model: transformers ``LlamaForCausalLM`` with tied word embeddings, saved with
  ``save_pretrained`` (safetensors) next to the tokenizer, so ``AutoModelForCausalLM`` /
  ``AutoTokenizer.from_pretrained(path)`` load it exactly as they would a hub checkpoint.
- :func:`ensure_embedded` builds task data + tokenizer + model once into a folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .base import BaseRecipe, base_problems, pretrain

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>")
PAD, BOS, EOS = SPECIAL_TOKENS[:3]

# Short on purpose: every template character is a token in every training row.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinyModelConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512


# Chosen by measurement on a 2-core CPU (docs/embedded_task.md): "tiny" learns the easy level
# of the embedded task in ~2 minutes of SFT.
SIZES: dict[str, TinyModelConfig] = {
    "micro": TinyModelConfig(64, 2, 4, 2, 256),      # for unit tests: fastest possible
    "tiny": TinyModelConfig(128, 4, 4, 2, 512),
    "small": TinyModelConfig(256, 6, 8, 4, 1024),
}


def build_tokenizer(out_dir: str | os.PathLike | None = None):
    """A byte-level PreTrainedTokenizerFast (vocab 262); saved to out_dir when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())       # the 256 byte symbols
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: with no merges the pre-split would only cost time
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]), padding_side="left",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(out_dir: str | os.PathLike | None, tokenizer, size: str = "tiny", seed: int = 0):
    """A randomly initialised LlamaForCausalLM (tied embeddings, fp32); saved to out_dir when given.

    Llama rather than Qwen2: for model_type "qwen2", transformers 5's AutoTokenizer forces its own
    Qwen2Tokenizer pipeline (NFC normaliser, regex pre-split, an extra <|endoftext|>), so the
    tokenizer would not load back as built; for "llama" it honours tokenizer_class.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise ValueError(f"build_tiny_model: unknown size {size!r}; known: {sorted(SIZES)}")
    c = SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):      # deterministic weights, caller's RNG untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if out_dir is not None:
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    return model


MANIFEST = "embedded.json"


# Bump when what ensure_embedded generates changes for the same arguments (2: the easy level changed; 3: the
# 4-operand and parenthesised levels, the base pretraining), so that a folder built by an older version is never
# reused (the trainer's default folder name includes it).
EMBEDDED_VERSION = 3


# The base pretraining per model size (fastupg.task.base): "tiny" gets the partial competence the demo's story
# needs (docs/embedded_task.md); "micro" (unit tests) stays the random model, whose numerics the trainer's tests
# pin (their own tests build micro bases with a few steps, and reproduce.py --quick a 2-step tiny base).
BASE_RECIPES: dict[str, BaseRecipe] = {
    "micro": BaseRecipe(steps=0),
    "tiny": BaseRecipe(),
    "small": BaseRecipe(),
}


def base_recipe(size: str, steps: int = -1) -> BaseRecipe | None:
    """The size's base recipe with `steps` optimizer steps (-1: the recipe's own); None when it trains 0 steps
    (the embedded model is then the random one)."""
    if size not in BASE_RECIPES:
        raise ValueError(f"base_recipe: unknown size {size!r}; known: {sorted(BASE_RECIPES)}")
    if steps < -1:
        raise ValueError(f"base steps must be >= 0 (or -1: the size's default), got {steps}")
    r = BASE_RECIPES[size] if steps == -1 else replace(BASE_RECIPES[size], steps=steps)
    return r if r.steps else None


def ensure_embedded(out_dir: str | os.PathLike, seed: int = 0, size: str = "tiny", task=None,
                    base: BaseRecipe | None = None, log=None) -> Path:
    """Build (once) train/eval jsonl + tokenizer + model into out_dir and return out_dir.

    Layout: ``out_dir/model`` (model + tokenizer, load with from_pretrained),
    ``out_dir/data/{train,eval}.jsonl``, ``out_dir/embedded.json`` (what was built).
    `base`: pretrain the random model first (fastupg.task.base; None: keep it random), on problems that
    share no prompt with the held-out split. `log`: progress lines of that pretraining.
    Idempotent: an existing folder built with the same (seed, size, task, base) is returned as is; one
    built with other settings raises ValueError rather than being silently reused. Atomic: the
    build happens in a temporary sibling folder renamed into place at the end, so a crash never
    leaves a half-built folder that looks valid.
    """
    from .arith import ArithConfig, read_jsonl, write_splits

    task = task if task is not None else ArithConfig(seed=seed)
    want = {"seed": seed, "size": size, "task": _jsonable(asdict(task)), "version": EMBEDDED_VERSION,
            "base": _jsonable(asdict(base)) if base is not None else None}
    out = Path(out_dir)
    manifest = out / MANIFEST
    if manifest.exists():
        have = json.loads(manifest.read_text())
        if have.get("spec") != want:
            raise ValueError(f"ensure_embedded: {out} was built with {have.get('spec')}, not {want}; "
                             "pass another out_dir or delete it")
        return out
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"ensure_embedded: {out} exists, is not empty and has no {MANIFEST}; "
                         "refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        paths = write_splits(tmp / "data", task)
        tok = build_tokenizer(tmp / "model")
        if base is None:
            build_tiny_model(tmp / "model", tok, size=size, seed=seed)
        else:
            model = build_tiny_model(None, tok, size=size, seed=seed)
            held = {r["prompt"] for r in read_jsonl(paths["eval"])}
            pretrain(model, tok, base_problems(base, exclude=held), base, log=log)
            model.save_pretrained(str(tmp / "model"), safe_serialization=True)
        (tmp / MANIFEST).write_text(json.dumps({
            "spec": want, "model": "model",
            "train": str(paths["train"].relative_to(tmp)), "eval": str(paths["eval"].relative_to(tmp)),
        }, indent=2))
        try:
            if out.exists() and not (out / MANIFEST).exists():
                out.rmdir()  # an empty folder (checked above); raises if another build landed there meanwhile
            os.rename(tmp, out)
        except OSError:
            # another process finished first: use its build if it is the same one
            if (out / MANIFEST).exists():
                shutil.rmtree(tmp, ignore_errors=True)
                return ensure_embedded(out, seed=seed, size=size, task=task, base=base)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _jsonable(x):
    return json.loads(json.dumps(x))
