"""Training and evaluation sets from a local file or a Hugging Face dataset name.

    records = load_records("openr1.parquet")                       # list[dict], raw rows
    examples = load_examples("openr1.parquet", tokenizer)          # list[Example], tokenized

Sources: ``.json`` (a list of objects, or JSON lines), ``.jsonl``, ``.parquet``, a folder
written by ``Dataset.save_to_disk`` or holding such files, or a Hugging Face dataset name
(``datasets.load_dataset``; works only where the hub is reachable).

Columns are mapped by a small frozen :class:`ColumnConfig`; dotted names reach into nested
fields. Presets:

- :data:`LUFFY_COLUMNS`: LUFFY's ``openr1.parquet`` / ``Elliott/Openr1-Math-46k-8192`` as used
  by the HPT paper: ``prompt`` (chat messages, system + user), ``target`` (chat messages: the
  DeepSeek-R1 demonstration as one assistant turn), ``reward_model.ground_truth`` (the gold
  answer), ``data_source``.
- :data:`EVAL_COLUMNS`: ``prompt`` (question text) and ``answer`` (gold), the layout of the
  paper's released evaluation files (AIME24.json, MATH-500.json, ...).

``columns=None`` picks the preset that fits the first row.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .prompts import PromptConfig, render_prompt

__all__ = [
    "ColumnConfig", "LUFFY_COLUMNS", "EVAL_COLUMNS", "DataConfig", "Example",
    "load_records", "detect_columns", "load_examples", "dataset_name",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ColumnConfig:
    prompt: str = "prompt"                       # question text, or chat messages
    answer: str = "reward_model.ground_truth"    # gold answer (str, number, or a one-item list)
    target: str | None = "target"                # demonstration text or chat messages; None: none
    source: str | None = "data_source"           # benchmark/source name per row; None: none


LUFFY_COLUMNS = ColumnConfig()
EVAL_COLUMNS = ColumnConfig(prompt="prompt", answer="answer", target=None, source=None)


@dataclass(frozen=True)
class DataConfig:
    columns: ColumnConfig | None = None          # None: detect from the first row
    split: str = "train"                         # for Hugging Face names and dataset folders
    prompt: PromptConfig = field(default_factory=PromptConfig)
    max_prompt_tokens: int | None = None         # longer prompts are dropped (None: keep all)
    max_demo_tokens: int | None = None           # longer demonstrations are dropped (the paper: 8192)
    require_demo: bool = False                   # drop rows without a demonstration
    limit: int | None = None                     # first N rows (before filtering)
    append_eos_to_demo: bool = True              # demonstrations end with eos, as rollouts do

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_demo_tokens", "limit"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"DataConfig.{name} must be a positive int or None, got {v!r}")


@dataclass
class Example:
    index: int                      # row index in the source
    question: str
    prompt_text: str                # model input, chat template applied
    prompt_ids: list[int]
    answer: str                     # gold answer, for the verifier
    demo_text: str | None = None    # demonstration (off-policy target), None when the row has none
    demo_ids: list[int] | None = None
    source: str | None = None       # data_source column, when there is one


# ---------------------------------------------------------------------------------------------
# raw rows
# ---------------------------------------------------------------------------------------------

_LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        rows = json.loads(text)
    elif path.suffix == ".json" and stripped.startswith("{") and "\n{" not in stripped:
        obj = json.loads(text)
        # {"data": [...]} or a dict of equal-length columns
        if isinstance(obj.get("data"), list):
            rows = obj["data"]
        elif obj and all(isinstance(v, list) for v in obj.values()):
            n = {len(v) for v in obj.values()}
            if len(n) != 1:
                raise ValueError(f"{path}: a dict of columns with different lengths {sorted(n)}")
            keys = list(obj)
            rows = [dict(zip(keys, vals)) for vals in zip(*obj.values())]
        else:
            rows = [obj]
    else:  # JSON lines
        rows = []
        for ln, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{ln}: not valid JSON lines ({e})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected JSON objects as rows")
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq  # comes with `datasets`

    return pq.read_table(str(path)).to_pylist()


def load_records(source: str | os.PathLike, split: str = "train") -> list[dict]:
    """Raw rows of a local file/folder or a Hugging Face dataset name, as a list of dicts."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix in (".json", ".jsonl"):
            return _read_json(path)
        if path.suffix == ".parquet":
            return _read_parquet(path)
        raise ValueError(f"load_records: unsupported file type {path.suffix!r} for {path}; "
                         f"use one of {_LOCAL_SUFFIXES}")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"load_records: {path} has splits {list(ds)}, not {split!r}")
                ds = ds[split]
            return ds.to_list()
        files = sorted(p for p in path.iterdir() if p.suffix in _LOCAL_SUFFIXES)
        chosen = [p for p in files if p.stem.startswith(split)] or files
        if not chosen:
            raise ValueError(f"load_records: folder {path} holds no {_LOCAL_SUFFIXES} files")
        rows: list[dict] = []
        for p in chosen:
            rows.extend(load_records(p, split))
        return rows
    s = str(source)
    if s.endswith(_LOCAL_SUFFIXES) or s.startswith((".", "/", "~")):
        raise FileNotFoundError(f"load_records: no such file or folder: {s}")
    return _load_hub(s, split)


def _load_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise ImportError("loading a dataset by name needs `datasets` (pip install datasets)") from e
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise RuntimeError(
            f"could not load {name!r} (split {split!r}) as a Hugging Face dataset: {type(e).__name__}: {e}\n"
            "A dataset name works only where the Hugging Face hub is reachable (and HF_DATASETS_OFFLINE "
            "is not set). Elsewhere, download it on a machine with hub access, e.g.\n"
            f"  python -c \"import datasets; datasets.load_dataset('{name}', split='{split}')"
            f".to_parquet('{name.split('/')[-1]}.parquet')\"\n"
            "and pass the local .parquet/.json/.jsonl path instead."
        ) from e
    return ds.to_list()


def dataset_name(source: str | os.PathLike) -> str:
    """A short display name: the file stem, or the last part of a hub name."""
    s = str(source).rstrip("/")
    p = Path(s)
    if p.suffix in _LOCAL_SUFFIXES:
        return p.stem
    return p.name or s


# ---------------------------------------------------------------------------------------------
# columns
# ---------------------------------------------------------------------------------------------

_MISSING = object()


def _get(row: dict, dotted: str) -> Any:
    cur: Any = row
    for part in dotted.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return _MISSING
    return cur


def detect_columns(row: dict) -> ColumnConfig:
    """The column preset that fits `row` (LUFFY parquet, eval json, or common alternatives)."""
    def first(*names):
        for n in names:
            if _get(row, n) is not _MISSING:
                return n
        return None

    prompt = first("prompt", "problem", "question", "query", "input")
    answer = first("reward_model.ground_truth", "answer", "ground_truth", "final_answer", "gold", "label")
    if prompt is None or answer is None:
        raise ValueError(
            f"cannot tell the columns of rows with keys {sorted(row)}: need a prompt column "
            "(prompt/problem/question) and an answer column (reward_model.ground_truth/answer/...); "
            "pass a ColumnConfig")
    target = first("target", "demonstration", "response")
    source = first("data_source", "source")
    return ColumnConfig(prompt=prompt, answer=answer, target=target, source=source)


def _split_messages(value: Any, what: str, index: int) -> tuple[str, str | None]:
    """(text, system) of a prompt column: a string, or chat messages (last user turn)."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        system = next((m.get("content") for m in value if m.get("role") == "system"), None)
        users = [m.get("content") for m in value if m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise ValueError(f"row {index}: {what} messages have no user turn")
        return users[-1], system
    raise ValueError(f"row {index}: {what} must be a string or chat messages, got {type(value).__name__}")


def _demo_text(value: Any, index: int) -> str | None:
    if value is None or value is _MISSING:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        if all(isinstance(m, dict) for m in value):
            turns = [m.get("content") for m in value if m.get("role", "assistant") == "assistant"]
            if turns and isinstance(turns[0], str):
                return turns[0]
        if isinstance(value[0], str):
            return value[0]
    raise ValueError(f"row {index}: demonstration must be a string or chat messages, got {type(value).__name__}")


def _answer_text(value: Any, index: int) -> str:
    if value is _MISSING or value is None:
        raise ValueError(f"row {index}: no gold answer")
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = value[0]
        else:
            value = ", ".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if not text:
        raise ValueError(f"row {index}: empty gold answer")
    return text


# ---------------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------------

def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    out = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(x) for x in out]


def load_examples(source: str | os.PathLike | Sequence[dict], tokenizer, cfg: DataConfig = DataConfig()) -> list[Example]:
    """Rows -> tokenized :class:`Example` s, prompt built with the chat template, long rows dropped.

    `source` is anything :func:`load_records` takes, or already-loaded rows.
    """
    rows = list(source) if isinstance(source, (list, tuple)) else load_records(source, cfg.split)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    if not rows:
        return []
    cols = cfg.columns or detect_columns(rows[0])

    questions, systems, answers, demos, sources = [], [], [], [], []
    for i, row in enumerate(rows):
        pv = _get(row, cols.prompt)
        if pv is _MISSING:
            raise ValueError(f"row {i}: no prompt column {cols.prompt!r} (keys: {sorted(row)})")
        q, sys_ = _split_messages(pv, "prompt", i)
        questions.append(q)
        systems.append(sys_)
        answers.append(_answer_text(_get(row, cols.answer), i))
        demos.append(_demo_text(_get(row, cols.target), i) if cols.target else None)
        src = _get(row, cols.source) if cols.source else _MISSING
        sources.append(None if src is _MISSING or src is None else str(src))

    prompt_texts = [render_prompt(q, tokenizer, cfg.prompt, s) for q, s in zip(questions, systems)]
    prompt_ids = _encode(tokenizer, prompt_texts)
    demo_idx = [i for i, d in enumerate(demos) if d is not None]
    demo_ids: list[list[int] | None] = [None] * len(rows)
    eos = getattr(tokenizer, "eos_token_id", None)
    if cfg.append_eos_to_demo and demo_idx and eos is None:
        raise ValueError("the tokenizer has no eos_token_id to end demonstrations with; "
                         "set DataConfig(append_eos_to_demo=False)")
    for i, ids in zip(demo_idx, _encode(tokenizer, [demos[i] for i in demo_idx])):
        demo_ids[i] = ids + [eos] if cfg.append_eos_to_demo else ids

    out: list[Example] = []
    dropped = {"long_prompt": 0, "long_demo": 0, "no_demo": 0}
    for i in range(len(rows)):
        if cfg.max_prompt_tokens is not None and len(prompt_ids[i]) > cfg.max_prompt_tokens:
            dropped["long_prompt"] += 1
            continue
        if demo_ids[i] is None and cfg.require_demo:
            dropped["no_demo"] += 1
            continue
        if demo_ids[i] is not None and cfg.max_demo_tokens is not None and len(demo_ids[i]) > cfg.max_demo_tokens:
            dropped["long_demo"] += 1
            continue
        out.append(Example(index=i, question=questions[i], prompt_text=prompt_texts[i], prompt_ids=prompt_ids[i],
                           answer=answers[i], demo_text=demos[i], demo_ids=demo_ids[i], source=sources[i]))
    if any(dropped.values()):
        log.info("load_examples(%s): kept %d of %d rows; dropped %s", dataset_name(source) if not isinstance(
            source, (list, tuple)) else "rows", len(out), len(rows), dropped)
    return out
