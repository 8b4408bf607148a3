"""Every example schema under tests/fixtures/ end to end, as a user would run it: `fastupg data` (the dry
run: columns found, rows kept and dropped per reason) and then a 2-step `fastupg train` (HPT, which needs
both a gold answer and a demonstration per row) on the shared micro embedded model."""
import re
import tempfile
from pathlib import Path

import pytest

from fastupg import cli

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EMB = str(Path(tempfile.gettempdir()) / "fastupg-test-emb")   # the micro model other tests build too

# file -> (columns line `fastupg data` must print, usable rows, dropped rows as (reason, count))
SCHEMAS = {
    "math.jsonl": ("prompt='problem', demonstration='solution', answer=last \\boxed{} of the demonstration",
                   4, [("no answer", 1)]),
    "openr1.jsonl": ("prompt='problem', demonstration='solution', answer='answer', source='source'",
                     3, [("no answer", 1)]),
    "deepscaler.json": ("prompt='problem', demonstration='solution', answer='answer', source=None", 3, []),
    "luffy.parquet": ("prompt='prompt', demonstration='target', answer='reward_model.ground_truth', "
                      "source='data_source'", 3, []),
    "prompt_completion.jsonl": ("prompt='prompt', demonstration='completion', answer=last \\boxed{}", 3, []),
    "messages.jsonl": ("messages='messages'", 3, []),
}


def _args(tmp_path, name):
    recipe = tmp_path / "recipe.yaml"   # `fastupg train` needs a recipe (--config); the overrides do the rest
    recipe.write_text("loss_type: hpt\n")
    return ["--config", str(recipe), f"train_file={FIXTURES / name}", "model=embedded", "model_size=micro", f"embedded_dir={EMB}",
            "loss_type=hpt", "num_generations=2", "per_device_train_batch_size=4", "max_completion_length=96",
            "max_steps=2", "learning_rate=1e-3", "report_to=none", "plot=false", "progress_bar=false",
            "save_steps=0", "num_threads=1", f"output_dir={tmp_path / 'run'}"]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_through_data_and_train(tmp_path, capsys, name):
    columns, usable, dropped = SCHEMAS[name]
    assert cli.main(["data", *_args(tmp_path, name)]) == 0
    out = capsys.readouterr().out
    assert columns in out, out
    assert f"usable: {usable}\n" in out, out
    counts = {m[1]: int(m[2]) for m in re.finditer(r"dropped, ([a-z ]+?)(?: \(> \d+ tokens\))?: (\d+)", out)}
    assert counts == {r: dict(dropped).get(r, 0) for r in
                      ("prompt too long", "demonstration too long", "no answer", "no demonstration")}, out
    for reason, _ in dropped:
        assert re.search(f"dropped, {reason}: \\d+; e.g. row \\d", out), out

    assert cli.main(["train", *_args(tmp_path, name)]) == 0
    out = capsys.readouterr().out
    assert f"usable: {usable}\n" in out, out         # training prints the same report first
    assert (tmp_path / "run" / "checkpoint-2").is_dir() or any((tmp_path / "run").glob("*checkpoint*")), out


# -- errors: one line on stderr, exit 2, before the model is loaded --------------------------------------------

def test_missing_demonstration_column_names_the_keys_and_the_key_to_set(tmp_path, capsys, monkeypatch):
    import fastupg.trainer as T
    monkeypatch.setattr(T, "load_model", lambda *a, **k: pytest.fail("the model was loaded despite bad data"))
    f = tmp_path / "qa.jsonl"
    f.write_text('{"question": "What is 1+1?", "reward_model": {"ground_truth": "2"}}\n')
    for cmd in ("data", "train"):
        assert cli.main([cmd, *_args(tmp_path, f)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "no demonstration column" in err, err
        assert "['question', 'reward_model', 'reward_model.ground_truth']" in err and "set response_key" in err
    # GRPO needs no demonstration: the same file is usable
    assert cli.main(["data", *_args(tmp_path, f), "loss_type=grpo"]) == 0
    assert "usable: 1\n" in capsys.readouterr().out


def test_nothing_usable_exits_2_after_the_counts(tmp_path, capsys):
    assert cli.main(["data", *_args(tmp_path, "deepscaler.json"), "max_prompt_length=8"]) == 2
    cap = capsys.readouterr()
    assert "usable: 0\n" in cap.out and "dropped, prompt too long (> 8 tokens): 3; e.g. row 0" in cap.out
    assert cap.err.count("\n") == 1 and "no usable examples" in cap.err


def test_explicit_keys_and_bad_keys(tmp_path, capsys):
    # dotted path into a nested field, OpenR1's verified R1 generation as the demonstration
    args = _args(tmp_path, "openr1.jsonl")
    assert cli.main(["data", *args, "response_key=generations", "answer_key=answer", "source_key=null"]) == 0
    out = capsys.readouterr().out
    assert "prompt='problem', demonstration='generations', answer='answer', source=None" in out
    assert cli.main(["data", *_args(tmp_path, "luffy.parquet"), "answer_key=reward_model.style"]) == 0
    assert "answer='reward_model.style'" in capsys.readouterr().out
    # checked by the configuration before anything is read
    for bad, words in [("response_key=null", "response_key cannot be null"),
                       ("prompt_key=a..b", "prompt_key='a..b' must be a column name"),
                       ("promt_key=x", "did you mean 'prompt_key'")]:
        assert cli.main(["data", *args, bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert cli.main(["data", *args, "train_file=nope.jsonl"]) == 2
    assert "no such data file or folder: nope.jsonl" in capsys.readouterr().err
