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
    return [f"train_file={FIXTURES / name}", "model=embedded", "model_size=micro", f"embedded_dir={EMB}",
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
