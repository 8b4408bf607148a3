"""Training and evaluation sets from a local file or a Hugging Face dataset name.

    records = load_records("openr1.parquet")                       # list[dict], raw rows
    examples = load_examples("openr1.parquet", tokenizer)          # list[Example], tokenized
    examples, report = load_examples_report("train.jsonl", tokenizer, cfg)   # + what was dropped and why

Sources: ``.json`` (a list of objects, or JSON lines), ``.jsonl``, ``.parquet``, a folder
written by ``Dataset.save_to_disk`` or holding such files, or a Hugging Face dataset name
(``datasets.load_dataset``; works only where the hub is reachable).

Columns are mapped by a small frozen :class:`ColumnConfig`; dotted names reach into nested
fields (``reward_model.ground_truth``). Presets:

- :data:`LUFFY_COLUMNS`: LUFFY's ``openr1.parquet`` / ``Elliott/Openr1-Math-46k-8192`` as used
  by the HPT paper: ``prompt`` (chat messages, system + user), ``target`` (chat messages: the
  DeepSeek-R1 demonstration as one assistant turn), ``reward_model.ground_truth`` (the gold
  answer), ``data_source``.
- :data:`EVAL_COLUMNS`: ``prompt`` (question text) and ``answer`` (gold), the layout of the
  paper's released evaluation files (AIME24.json, MATH-500.json, ...).

``columns=None`` detects the columns from the first row (:func:`detect_columns`): the LUFFY /
verl layout, MATH / NuminaMath / OpenR1-Math / DeepScaleR (``problem``, ``solution``,
``answer``, ``generations``), TRL's prompt/completion pairs and TRL's conversational
``messages``. A set without an answer column (MATH, NuminaMath-CoT) takes the gold answer from
the last ``\\boxed{}`` of the demonstration.

Rows that cannot train are dropped, each counted under the first reason that applies
(:data:`DROP_REASONS`); :class:`DataReport` says how many and shows one of each.
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
    "ColumnConfig", "LUFFY_COLUMNS", "EVAL_COLUMNS", "DROP_REASONS", "DataConfig", "DataError", "DataReport",
    "Example", "load_records", "detect_columns", "load_examples", "load_examples_report", "dataset_name",
    "train_data_config",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ColumnConfig:
    """Where each field of a row is (dotted names reach nested fields). TrainConfig's keys in brackets."""
    prompt: str = "prompt"                       # [prompt_key] question text, or chat messages (last user turn)
    answer: str | None = "reward_model.ground_truth"  # [answer_key] gold answer (str, number, one-item list);
    #                                              None: the last \\boxed{} of the demonstration
    target: str | None = "target"                # [response_key] demonstration: text, chat messages, or a list
    #                                              of texts (the first; OpenR1's `generations`: the first verified)
    source: str | None = "data_source"           # [source_key] benchmark/source name per row; None: none
    messages: str | None = None                  # [messages_key] a whole chat instead of prompt/target: prompt =
    #                                              the last user turn (+ system turn), demonstration = the
    #                                              final assistant turn

    def __post_init__(self):
        for name in ("prompt", "answer", "target", "source", "messages"):
            v = getattr(self, name)
            if v is None and name != "prompt":
                continue
            if not isinstance(v, str) or not v or any(not part for part in v.split(".")):
                raise ValueError(f"ColumnConfig.{name} must be a column name (dotted for nested fields), got {v!r}")


LUFFY_COLUMNS = ColumnConfig()
EVAL_COLUMNS = ColumnConfig(prompt="prompt", answer="answer", target=None, source=None)

# Why a row is dropped, in the order they are checked (a row counts once, under the first that applies).
DROP_REASONS = ("prompt too long", "demonstration too long", "no answer", "no demonstration")


class DataError(ValueError):
    """The data cannot train as configured (missing columns, nothing usable): one line for the user."""


class DataFileNotFoundError(FileNotFoundError, DataError):
    """No such data file or folder (both a FileNotFoundError and a DataError)."""


@dataclass(frozen=True)
class DataConfig:
    columns: ColumnConfig | dict | None = None   # None: detect from the first row; a dict: detect_columns(row,
    #                                              **columns), i.e. those fields given, the others detected
    split: str = "train"                         # for Hugging Face names and dataset folders
    prompt: PromptConfig = field(default_factory=PromptConfig)
    max_prompt_tokens: int | None = None         # longer prompts are dropped (None: keep all)
    max_demo_tokens: int | None = None           # longer demonstrations are dropped (the paper: 8192)
    require_demo: bool = False                   # drop rows without a demonstration (and need a column for it)
    require_answer: bool = True                  # drop rows without a gold answer (False: answer "" there)
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
        raise DataFileNotFoundError(f"no such data file or folder: {s}")
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


# Candidate names, most specific first. The verl/LUFFY layout (prompt, target,
# reward_model.ground_truth, data_source); MATH (problem, solution), NuminaMath (problem, solution,
# messages, source), OpenR1-Math (problem, solution, answer, generations), DeepScaleR (problem, answer,
# solution); TRL's prompt/completion pairs and conversational `messages`.
PROMPT_NAMES = ("prompt", "problem", "question", "query", "input", "instruction")
ANSWER_NAMES = ("reward_model.ground_truth", "answer", "ground_truth", "final_answer", "gold", "label",
                "expected_answer")
DEMO_NAMES = ("target", "demonstration", "response", "completion", "solution", "generations")
SOURCE_NAMES = ("data_source", "source")
MESSAGES_NAMES = ("messages", "conversations")


def _keys(row: dict) -> list[str]:
    """The row's keys, nested dicts spelled out as dotted paths (what a *_key setting can name)."""
    out = []
    for k, v in row.items():
        out.append(str(k))
        if isinstance(v, dict):
            out.extend(f"{k}.{sub}" for sub in _keys(v))
    return out


def detect_columns(row: dict, **given: str | None) -> ColumnConfig:
    """The columns of rows like `row`: each ColumnConfig field from `given` (a column name, or None for
    "there is none"), the others detected by the candidate names above.

    A prompt column wins over a `messages` column (NuminaMath has both); with neither, ValueError
    naming the keys seen and the key to set.
    """
    unknown = set(given) - {"prompt", "answer", "target", "source", "messages"}
    if unknown:
        raise TypeError(f"detect_columns: unknown column field(s) {sorted(unknown)}")

    def first(names):
        return next((n for n in names if _get(row, n) is not _MISSING), None)

    messages = given["messages"] if "messages" in given else (
        None if "prompt" in given or first(PROMPT_NAMES) else first(MESSAGES_NAMES))
    if messages is not None:
        prompt = "<messages>"  # unused: the prompt comes from the messages
        target = given["target"] if "target" in given else messages
    else:
        prompt = given.get("prompt") or first(PROMPT_NAMES)
        if prompt is None:
            raise DataError(f"cannot find the prompt column among the keys {_keys(row)}: set prompt_key "
                            f"(looked for {', '.join(PROMPT_NAMES)}, or a chat column {' / '.join(MESSAGES_NAMES)})")
        target = given["target"] if "target" in given else first(DEMO_NAMES)
    answer = given["answer"] if "answer" in given else first(ANSWER_NAMES)
    source = given["source"] if "source" in given else first(SOURCE_NAMES)
    return ColumnConfig(prompt=prompt, answer=answer, target=target, source=source, messages=messages)


def _split_messages(value: Any, what: str, index: int) -> tuple[str, str | None]:
    """(text, system) of a prompt column: a string, or chat messages (last user turn)."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        system = next((m.get("content") for m in value if m.get("role") == "system"), None)
        users = [m.get("content") for m in value if m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise DataError(f"row {index}: {what} messages have no user turn")
        return users[-1], system
    raise DataError(f"row {index}: {what} must be a string or chat messages, got {type(value).__name__}")


def _split_chat(value: Any, what: str, index: int) -> tuple[str, str | None, str | None]:
    """(question, system, demonstration) of a whole chat: the demonstration is the final assistant turn
    (None when the chat does not end with one), the question the last user turn before it."""
    if not (isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value)):
        raise DataError(f"row {index}: {what} must be chat messages (role/content dicts), got {type(value).__name__}")
    turns = list(value)
    demo = None
    if turns[-1].get("role") == "assistant":
        demo = turns.pop().get("content")
    q, system = _split_messages(turns, what, index) if turns else (None, None)
    if q is None:
        raise DataError(f"row {index}: {what} messages have no user turn")
    return q, system, demo if isinstance(demo, str) and demo else None


def _demo_text(value: Any, index: int, row: dict | None = None) -> str | None:
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
                return turns[0] or None
        if all(isinstance(v, str) for v in value):
            # OpenR1-Math: several R1 generations with a math-verify flag each; take the first verified one
            ok = (row or {}).get("correctness_math_verify")
            if isinstance(ok, (list, tuple)) and len(ok) == len(value) and any(ok):
                return value[list(ok).index(True)] or None
            return value[0] or None
    raise DataError(f"row {index}: demonstration must be a string, chat messages or a list of strings, "
                    f"got {type(value).__name__}")


def _answer_text(value: Any) -> str | None:
    """The gold answer as text, or None when the row has none."""
    if value is _MISSING or value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        value = value[0] if len(value) == 1 else ", ".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _boxed(text: str | None) -> str | None:
    if not text:
        return None
    from fastupg.rewards.math import extract_last_boxed  # the verifier's own extraction, so gold matches it
    got = extract_last_boxed(text)
    return got.strip() or None if got is not None else None


# ---------------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------------

def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    out = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(x) for x in out]


def _clip(text: str | None, n: int = 100, squash: bool = True) -> str:
    """A short quoted excerpt, LaTeX backslashes as they are; `squash` folds whitespace runs (else a
    newline shows as \\n)."""
    text = " ".join((text or "").split()) if squash else (text or "").replace("\n", "\\n")
    return '"' + (text if len(text) <= n else text[: n - 3] + "...") + '"'


@dataclass
class DataReport:
    """What :func:`load_examples_report` kept and dropped, and why (printed by `fastupg data` and training)."""
    name: str
    rows: int
    columns: ColumnConfig | None
    kept: int = 0
    dropped: dict = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    example: dict = field(default_factory=dict)      # reason -> one dropped row, described
    max_prompt_tokens: int | None = None
    max_demo_tokens: int | None = None
    first_prompt: str | None = None                  # the first usable row's rendered prompt

    def columns_line(self) -> str:
        c = self.columns
        if c is None:
            return "columns: (no rows)"
        parts = ([f"messages={c.messages!r} (prompt: last user turn, demonstration: final assistant turn)"]
                 if c.messages else [f"prompt={c.prompt!r}", f"demonstration={c.target!r}"])
        parts.append(f"answer={c.answer!r}" if c.answer else "answer=last \\boxed{} of the demonstration")
        parts.append(f"source={c.source!r}")
        return "columns: " + ", ".join(parts)

    def summary(self) -> str:
        drops = ", ".join(f"{r}: {n}" for r, n in self.dropped.items() if n)
        return f"{self.kept} of {self.rows} rows usable" + (f" (dropped: {drops})" if drops else "")

    def format(self) -> str:
        limit = {"prompt too long": f" (> {self.max_prompt_tokens} tokens)",
                 "demonstration too long": f" (> {self.max_demo_tokens} tokens)"}
        lines = [f"data {self.name}: {self.rows} rows", "  " + self.columns_line(),
                 f"  usable: {self.kept}"]
        for r in DROP_REASONS:
            line = f"  dropped, {r}{limit.get(r, '')}: {self.dropped[r]}"
            if r in self.example:
                line += f"; e.g. {self.example[r]}"
            lines.append(line)
        if self.first_prompt is not None:
            lines.append(f"  first usable prompt, as the model sees it: {_clip(self.first_prompt, 300, squash=False)}")
        return "\n".join(lines)


def load_examples(source: str | os.PathLike | Sequence[dict], tokenizer, cfg: DataConfig = DataConfig()) -> list[Example]:
    """Rows -> tokenized :class:`Example` s, prompt built with the chat template, unusable rows dropped.

    `source` is anything :func:`load_records` takes, or already-loaded rows.
    """
    out, report = load_examples_report(source, tokenizer, cfg)
    if any(report.dropped.values()):
        log.info("load_examples(%s): %s", report.name, report.summary())
    return out


def load_examples_report(source: str | os.PathLike | Sequence[dict], tokenizer,
                         cfg: DataConfig = DataConfig()) -> tuple[list[Example], DataReport]:
    """:func:`load_examples` plus a :class:`DataReport` of what was dropped and why.

    Raises :class:`DataError` (a ValueError) for a schema problem: no prompt column, a prompt that is
    not text or chat messages, or `require_demo` with no demonstration column (naming the keys seen
    and the key to set).
    """
    is_rows = isinstance(source, (list, tuple))
    name = "rows" if is_rows else dataset_name(source)
    rows = list(source) if is_rows else load_records(source, cfg.split)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    report = DataReport(name=name, rows=len(rows), columns=None, max_prompt_tokens=cfg.max_prompt_tokens,
                        max_demo_tokens=cfg.max_demo_tokens)
    if not rows:
        return [], report
    cols = cfg.columns if isinstance(cfg.columns, ColumnConfig) else detect_columns(rows[0], **(cfg.columns or {}))
    report.columns = cols
    if cfg.require_demo and cols.target is None and cols.messages is None:
        raise DataError(
            f"{name} has no demonstration column (keys: {_keys(rows[0])}); set response_key to the column "
            f"that holds the worked solution (looked for {', '.join(DEMO_NAMES)}), or messages_key to a chat column")

    questions, systems, answers, demos, sources = [], [], [], [], []
    for i, row in enumerate(rows):
        if cols.messages:
            mv = _get(row, cols.messages)
            if mv is _MISSING:
                raise DataError(f"row {i}: no messages column {cols.messages!r} (keys: {_keys(row)}); set messages_key")
            q, sys_, demo = _split_chat(mv, cols.messages, i)
            if cols.target != cols.messages:
                demo = _demo_text(_get(row, cols.target), i, row) if cols.target else None
        else:
            pv = _get(row, cols.prompt)
            if pv is _MISSING or pv is None:
                raise DataError(f"row {i}: no prompt column {cols.prompt!r} (keys: {_keys(row)}); set prompt_key")
            q, sys_ = _split_messages(pv, f"prompt column {cols.prompt!r}", i)
            demo = _demo_text(_get(row, cols.target), i, row) if cols.target else None
        questions.append(q)
        systems.append(sys_)
        demos.append(demo)
        answers.append(_answer_text(_get(row, cols.answer)) if cols.answer else _boxed(demo))
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

    def why(i: int) -> tuple[str, str] | None:
        """(reason, one-line description) when row i cannot train, in DROP_REASONS order."""
        if cfg.max_prompt_tokens is not None and len(prompt_ids[i]) > cfg.max_prompt_tokens:
            return "prompt too long", f"row {i}, {len(prompt_ids[i])} tokens: {_clip(questions[i])}"
        if demo_ids[i] is not None and cfg.max_demo_tokens is not None and len(demo_ids[i]) > cfg.max_demo_tokens:
            return "demonstration too long", f"row {i}, {len(demo_ids[i])} tokens: {_clip(demos[i])}"
        if answers[i] is None and cfg.require_answer:
            where = f"column {cols.answer!r}" if cols.answer else "no \\boxed{} in the demonstration"
            return "no answer", f"row {i} ({where}): {_clip(questions[i])}"
        if demo_ids[i] is None and cfg.require_demo:
            return "no demonstration", f"row {i}: {_clip(questions[i])}"
        return None

    out: list[Example] = []
    for i in range(len(rows)):
        bad = why(i)
        if bad is not None:
            report.dropped[bad[0]] += 1
            report.example.setdefault(bad[0], bad[1])
            continue
        out.append(Example(index=i, question=questions[i], prompt_text=prompt_texts[i], prompt_ids=prompt_ids[i],
                           answer=answers[i] or "", demo_text=demos[i], demo_ids=demo_ids[i], source=sources[i]))
    report.kept = len(out)
    report.first_prompt = out[0].prompt_text if out else None
    return out, report


def train_data_config(cfg, embedded: bool, need_demo: bool, need_answer: bool = True) -> DataConfig:
    """The DataConfig that training uses for a fastupg.config.TrainConfig: one place for `fastupg train`
    and `fastupg data`, so the dry run keeps and drops exactly the rows training would."""
    if cfg.system_prompt == "auto":  # none for the embedded model (it was never taught one), else the paper's
        prompt = PromptConfig(system_prompt=None) if embedded else PromptConfig()
    else:
        prompt = PromptConfig(system_prompt=cfg.system_prompt)
    return DataConfig(columns=cfg.column_keys(), prompt=prompt, max_prompt_tokens=cfg.max_prompt_length,
                      max_demo_tokens=cfg.max_completion_length if need_demo else None, require_demo=need_demo,
                      require_answer=need_answer)
