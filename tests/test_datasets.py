"""fastupg.data: loading json/jsonl/parquet/folders, column mapping, chat prompts, length filters."""
import json
import random

import pytest

from fastupg.data.datasets import (
    EVAL_COLUMNS, LUFFY_COLUMNS, ColumnConfig, DataConfig, dataset_name, detect_columns,
    load_examples, load_examples_report, load_records,
)
from fastupg.data.prompts import LUFFY_SYSTEM_PROMPT, PromptConfig, build_messages, render_prompt


def _tokenizer(tmp_path):
    """The project's tiny byte-level tokenizer when present, else a tiny one built here."""
    try:
        from fastupg.task.tiny import build_tokenizer

        return build_tokenizer()
    except (ImportError, ValueError, TypeError):   # the embedded-task module missing or changed
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        specials = ["<pad>", "<s>", "</s>"]
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {t: i for i, t in enumerate(specials + alphabet)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(specials)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        fast.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}[assistant]{% endif %}")
        return fast


def _luffy_rows(n, rng):
    rows = []
    for i in range(n):
        q = f"What is {rng.randint(1, 99)} + {rng.randint(1, 99)}? " + "x" * rng.randint(0, 60)
        rows.append({
            "data_source": "openr1",
            "prompt": [{"role": "system", "content": "SYS-FROM-DATA"}, {"role": "user", "content": q}],
            "target": [{"role": "assistant", "content": "<think>\n" + "y" * rng.randint(5, 120) + "</think> \\boxed{3}"}],
            "ability": "math",
            "reward_model": {"ground_truth": str(rng.randint(0, 500)), "style": "rule"},
            "extra_info": {"index": i, "split": "train"},
        })
    return rows


def _write_parquet(rows, path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))


def test_luffy_parquet_roundtrip(tmp_path):
    rng = random.Random(0)
    rows = _luffy_rows(12, rng)
    _write_parquet(rows, tmp_path / "openr1.parquet")
    got = load_records(tmp_path / "openr1.parquet")
    assert got[3]["reward_model"]["ground_truth"] == rows[3]["reward_model"]["ground_truth"]
    assert detect_columns(got[0]) == LUFFY_COLUMNS

    tok = _tokenizer(tmp_path)
    ex = load_examples(tmp_path / "openr1.parquet", tok)
    assert len(ex) == 12
    e = ex[5]
    assert e.question == rows[5]["prompt"][1]["content"]
    assert e.answer == rows[5]["reward_model"]["ground_truth"]
    assert e.demo_text == rows[5]["target"][0]["content"]
    assert e.source == "openr1"
    # the paper's system prompt (not the data's) by default, rendered by the chat template
    assert LUFFY_SYSTEM_PROMPT in e.prompt_text and "SYS-FROM-DATA" not in e.prompt_text
    assert e.prompt_text == tok.apply_chat_template(build_messages(e.question), tokenize=False, add_generation_prompt=True)
    assert e.prompt_ids == tok(e.prompt_text, add_special_tokens=False)["input_ids"]
    assert e.demo_ids[-1] == tok.eos_token_id
    assert tok.decode(e.demo_ids[:-1]) == e.demo_text

    ex2 = load_examples(tmp_path / "openr1.parquet", tok, DataConfig(prompt=PromptConfig(use_data_system_prompt=True)))
    assert "SYS-FROM-DATA" in ex2[0].prompt_text


def test_length_filters_drop_exactly_the_long_rows(tmp_path):
    rng = random.Random(1)
    rows = _luffy_rows(40, rng)
    tok = _tokenizer(tmp_path)
    full = load_examples(rows, tok)
    plen = sorted(len(e.prompt_ids) for e in full)
    dlen = sorted(len(e.demo_ids) for e in full)
    pmax, dmax = plen[len(plen) // 2], dlen[len(dlen) // 3]
    kept = load_examples(rows, tok, DataConfig(max_prompt_tokens=pmax, max_demo_tokens=dmax))
    want = [e.index for e in full if len(e.prompt_ids) <= pmax and len(e.demo_ids) <= dmax]
    assert [e.index for e in kept] == want
    assert 0 < len(kept) < len(full)
    assert len(load_examples(rows, tok, DataConfig(limit=7))) == 7


def test_eval_json_layouts(tmp_path):
    rows = [{"prompt": f"Q{i}: compute {i}*{i}", "answer": str(i * i)} for i in range(9)]
    (tmp_path / "bench.json").write_text(json.dumps(rows))
    (tmp_path / "bench2.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "bench3.json").write_text(json.dumps({"prompt": [r["prompt"] for r in rows],
                                                      "answer": [r["answer"] for r in rows]}))
    for name in ("bench.json", "bench2.jsonl", "bench3.json"):
        assert load_records(tmp_path / name) == rows
    assert detect_columns(rows[0]) == EVAL_COLUMNS
    tok = _tokenizer(tmp_path)
    ex = load_examples(tmp_path / "bench.json", tok)
    assert [e.answer for e in ex] == [r["answer"] for r in rows]
    assert all(e.demo_ids is None for e in ex)
    with pytest.raises(ValueError):
        load_examples(tmp_path / "bench.json", tok, DataConfig(require_demo=True, limit=0))
    # demonstrations required but no column holds them: an error naming the keys seen and the key to set
    with pytest.raises(ValueError, match=r"no demonstration column \(keys: \['prompt', 'answer'\]\).*response_key"):
        load_examples(tmp_path / "bench.json", tok, DataConfig(require_demo=True))
    assert dataset_name(tmp_path / "bench.json") == "bench"
    assert dataset_name("HuggingFaceH4/MATH-500") == "MATH-500"


def test_folder_and_numeric_answers(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text(json.dumps({"problem": "p", "answer": 12.0}) + "\n")
    (d / "test.jsonl").write_text(json.dumps({"problem": "q", "answer": [7]}) + "\n")
    assert load_records(d, split="test") == [{"problem": "q", "answer": [7]}]
    tok = _tokenizer(tmp_path)
    assert load_examples(d, tok)[0].answer == "12"
    assert load_examples(d, tok, DataConfig(split="test"))[0].answer == "7"


def test_custom_columns_and_errors(tmp_path):
    rows = [{"q": {"text": "hello"}, "sol": "demo", "gold": "5"}]
    tok = _tokenizer(tmp_path)
    cols = ColumnConfig(prompt="q.text", answer="gold", target="sol", source=None)
    e = load_examples(rows, tok, DataConfig(columns=cols))[0]
    assert (e.question, e.demo_text, e.answer) == ("hello", "demo", "5")
    with pytest.raises(ValueError, match=r"cannot find the prompt column among the keys \[.foo.\]: set prompt_key"):
        detect_columns({"foo": 1})
    # a row without a gold answer is dropped and counted, not fatal
    ex, rep = load_examples_report([{"prompt": "x", "answer": None}, {"prompt": "y", "answer": 3}], tok)
    assert [e.question for e in ex] == ["y"] and rep.dropped["no answer"] == 1 and "row 0" in rep.example["no answer"]
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.parquet")
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_records(tmp_path / "x.csv")
    with pytest.raises(ValueError):
        DataConfig(max_demo_tokens=0)
    with pytest.raises(ValueError):
        PromptConfig(chat_template="jinja")


def test_hub_name_error_says_what_to_do(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="hub is reachable"):
        load_records("Elliott/Openr1-Math-46k-8192")


def test_plain_template_without_chat_template(tmp_path):
    tok = _tokenizer(tmp_path)
    text = render_prompt("2+2?", tok, PromptConfig(system_prompt="S", chat_template="plain"))
    assert text.endswith("S\n\n2+2?\n")
    msgs = build_messages("2+2?", PromptConfig(system_prompt=None, question_suffix=" Box it."))
    assert msgs == [{"role": "user", "content": "2+2? Box it."}]


# -- bring your own data: schemas, explicit keys, drop reasons ------------------------------------------------

def test_detects_the_common_math_schemas():
    math_row = {"problem": "p", "level": "Level 1", "type": "Algebra", "solution": "s \\boxed{1}"}
    numina = {"source": "olympiads", "problem": "p", "solution": "s", "messages": [{"role": "user", "content": "p"}]}
    openr1 = {"problem": "p", "solution": "s", "answer": "1", "generations": ["g"], "source": "amc"}
    deepscaler = {"problem": "p", "answer": "1", "solution": "s"}
    pairs = {"prompt": "p", "completion": "c"}
    chat = {"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]}
    assert detect_columns(math_row) == ColumnConfig(prompt="problem", answer=None, target="solution", source=None)
    assert detect_columns(numina) == ColumnConfig(prompt="problem", answer=None, target="solution", source="source")
    assert detect_columns(openr1) == ColumnConfig(prompt="problem", answer="answer", target="solution", source="source")
    assert detect_columns(deepscaler) == ColumnConfig(prompt="problem", answer="answer", target="solution", source=None)
    assert detect_columns(pairs) == ColumnConfig(prompt="prompt", answer=None, target="completion", source=None)
    embedded = {"prompt": "What is 3+5-2?", "solution": "3+5=8\n8-2=6\n\\boxed{6}", "answer": "6", "difficulty": 1}
    assert detect_columns(embedded) == ColumnConfig(prompt="prompt", answer="answer", target="solution", source=None)
    assert detect_columns(chat).messages == "messages" and detect_columns(chat).target == "messages"
    # given fields win; None means "there is none"
    assert detect_columns(openr1, target="generations", source=None) == ColumnConfig(
        prompt="problem", answer="answer", target="generations", source=None)
    with pytest.raises(ValueError, match=r"keys \['foo', 'bar', 'bar.baz'\]: set prompt_key"):
        detect_columns({"foo": 1, "bar": {"baz": 2}})


def test_answer_from_boxed_generations_and_messages(tmp_path):
    tok = _tokenizer(tmp_path)
    rows = [  # MATH: no answer column, the gold is the solution's last \boxed{} (nested braces kept)
        {"problem": "half?", "solution": "a \\boxed{2} then $\\boxed{\\frac{1}{2}}$"},
        {"problem": "no box", "solution": "just text"},
    ]
    ex, rep = load_examples_report(rows, tok)
    assert [(e.question, e.answer) for e in ex] == [("half?", "\\frac{1}{2}")]
    assert rep.dropped["no answer"] == 1 and "row 1 (no \\boxed{} in the demonstration)" in rep.example["no answer"]
    # OpenR1: the first generation math-verify marked correct, else the first
    r = {"problem": "q", "answer": "7", "generations": ["wrong", "right"], "correctness_math_verify": [False, True]}
    cols = {"target": "generations"}
    assert load_examples([r], tok, DataConfig(columns=cols))[0].demo_text == "right"
    assert load_examples([dict(r, correctness_math_verify=[False, False])], tok,
                         DataConfig(columns=cols))[0].demo_text == "wrong"
    # a whole chat: prompt = last user turn (+ its system turn when asked), demonstration = final assistant turn
    chat = {"messages": [{"role": "system", "content": "SYS"}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4 \\boxed{4}"}]}
    e = load_examples([chat], tok, DataConfig(prompt=PromptConfig(system_prompt=None, use_data_system_prompt=True)))[0]
    assert (e.question, e.demo_text, e.answer) == ("2+2?", "4 \\boxed{4}", "4") and "SYS" in e.prompt_text
    unanswered = {"messages": chat["messages"][:2]}   # ends on the user turn: no demonstration
    ex, rep = load_examples_report([chat, unanswered], tok, DataConfig(require_demo=True, require_answer=False))
    assert len(ex) == 1 and rep.dropped["no demonstration"] == 1


def test_each_row_dropped_once_under_the_first_reason(tmp_path):
    tok = _tokenizer(tmp_path)
    P = PromptConfig(system_prompt=None)
    rows = [
        {"prompt": "ok", "target": "d", "answer": "1"},
        {"prompt": "x" * 80, "target": "d" * 80, "answer": None},   # long prompt (also long demo, no answer)
        {"prompt": "ok", "target": "d" * 80, "answer": None},       # long demonstration (also no answer)
        {"prompt": "ok", "target": "d", "answer": ""},              # no answer
        {"prompt": "ok", "target": None, "answer": "2"},            # no demonstration
        {"prompt": "ok", "target": [], "answer": "3"},              # no demonstration
    ]
    cfg = DataConfig(prompt=P, max_prompt_tokens=40, max_demo_tokens=40, require_demo=True)
    ex, rep = load_examples_report(rows, tok, cfg)
    assert [e.index for e in ex] == [0]
    assert rep.dropped == {"prompt too long": 1, "demonstration too long": 1, "no answer": 1, "no demonstration": 2}
    assert rep.example["prompt too long"].startswith("row 1, ") and rep.example["no demonstration"].startswith("row 4")
    text = rep.format()
    assert "usable: 1" in text and "dropped, prompt too long (> 40 tokens): 1; e.g. row 1" in text
    assert rep.summary() == ("1 of 6 rows usable (dropped: prompt too long: 1, demonstration too long: 1, "
                             "no answer: 1, no demonstration: 2)")
    # without require_demo / require_answer those rows stay (answer "" where there is none)
    ex, rep = load_examples_report(rows[2:], tok, DataConfig(prompt=P, require_answer=False))
    assert len(ex) == 4 and not any(rep.dropped.values())
