"""The embedded task: generator, verifier, tokenizer, tiny model, ensure_embedded."""
import json
import random

import pytest
import torch

from fastupg.task.arith import LEVELS, ArithConfig, generate_splits, make_problem, read_jsonl, solve_steps, write_splits
from fastupg.task.verifier import arith_reward, last_boxed


# ---------------------------------------------------------------- generator
def test_splits_deterministic_and_seed_dependent():
    cfg = ArithConfig(seed=3, n_train=500, n_eval=60)
    assert generate_splits(cfg) == generate_splits(cfg)
    assert generate_splits(ArithConfig(seed=4, n_train=500, n_eval=60))[0] != generate_splits(cfg)[0]


def test_splits_disjoint_counts_and_mix():
    cfg = ArithConfig(seed=1, n_train=1200, n_eval=300, mix=((2, 2), (3, 1), (4, 1)))
    train, held = generate_splits(cfg)
    assert len(train) == 1200 and len(held) == 300
    tp, hp = {e["prompt"] for e in train}, {e["prompt"] for e in held}
    assert len(tp) == len(train) and len(hp) == len(held)        # no duplicates
    assert not tp & hp                                            # no leakage
    assert sum(e["difficulty"] == 2 for e in train) == 600
    assert sum(e["difficulty"] == 2 for e in held) == 150
    # the held-out rows are mixed, so that any prefix (the trainer's eval_samples) holds every level
    assert {e["difficulty"] for e in held[:30]} == {2, 3, 4}
    # held-out problems do not depend on the train size
    assert generate_splits(ArithConfig(seed=1, n_train=10, n_eval=300, mix=cfg.mix))[1] == held


def test_examples_are_correct_and_well_formed():
    train, held = generate_splits(ArithConfig(n_train=400, n_eval=50, mix=tuple((d, 1.0) for d in LEVELS)))
    for e in train + held:
        assert set(e) == {"prompt", "solution", "answer", "difficulty"}
        assert e["solution"].endswith("\\boxed{" + e["answer"] + "}")
        assert arith_reward(e["solution"], e["answer"]) == 1.0
        expr = e["prompt"].removeprefix("What is ").removesuffix("?")
        assert eval(expr) == int(e["answer"])                     # python precedence agrees
        n_ops = sum(expr[1:].count(o) for o in "+*") + expr[1:].count("-")
        assert len(e["solution"].split("\n")) == n_ops + 1        # one line per operation + box
        lo_hi = LEVELS[e["difficulty"]].result_range           # one-digit levels: every result one digit
        if lo_hi is not None:
            assert all(lo_hi[0] <= int(line.split("=")[1]) <= lo_hi[1] for line in e["solution"].split("\n")[:-1])


def test_solve_steps_precedence():
    steps, v = solve_steps([2, 3, 4, 5], ["+", "*", "-"])
    assert steps == ["3*4=12", "2+12=14", "14-5=9"] and v == 9
    with pytest.raises(ValueError):
        solve_steps([1, 2], [])


def test_difficulty_levels_grow():
    rng = random.Random(0)
    lens = {d: sum(len(make_problem(rng, d)["solution"]) for _ in range(200)) for d in LEVELS}
    assert lens[1] < lens[2] < lens[3]


def test_bad_config_raises():
    with pytest.raises(ValueError, match="difficulty"):
        ArithConfig(mix=((9, 1.0),))
    with pytest.raises(ValueError, match="weight"):
        ArithConfig(mix=((1, 0.0),))
    with pytest.raises(ValueError, match="distinct"):                # level 2 has only 1210 problems
        generate_splits(ArithConfig(n_train=5000, n_eval=0, mix=((2, 1.0),)))


def test_write_splits_jsonl(tmp_path):
    paths = write_splits(tmp_path, ArithConfig(n_train=50, n_eval=10))
    train = read_jsonl(paths["train"])
    assert len(train) == 50 and len(read_jsonl(paths["eval"])) == 10
    assert train == generate_splits(ArithConfig(n_train=50, n_eval=10))[0]
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- verifier
@pytest.mark.parametrize("response,gold,want", [
    ("so \\boxed{42}", "42", 1.0),
    ("\\boxed{ 4 2 }", "42", 1.0),                    # spaces ignored
    ("\\boxed{-17}", "-17", 1.0),
    ("\\boxed{-17}", " -17 ", 1.0),
    ("\\boxed{17}", "-17", 0.0),
    ("\\boxed{+5}", "5", 1.0),
    ("\\boxed{005}", "5", 1.0),                       # integer compare, not string
    ("\\boxed{1}\\boxed{2}", "2", 1.0),               # last box wins
    ("\\boxed{2}\\boxed{1}", "2", 0.0),
    ("\\boxed{2} then \\boxed{3", "2", 0.0),          # last box unclosed: malformed
    ("no box 42", "42", 0.0),
    ("", "42", 0.0),
    ("\\boxed{}", "0", 0.0),
    ("\\boxed{{42}}", "42", 0.0),                     # nested braces: content "{42}" is no integer
    ("\\boxed{\\frac{1}{2}}", "1", 0.0),
    ("\\boxed{4.0}", "4", 0.0),
    ("\\boxed{1,000}", "1000", 0.0),
    ("\\boxed{42} trailing text", "42", 1.0),
    ("\\boxed{4-2}", "2", 0.0),
])
def test_arith_reward(response, gold, want):
    assert arith_reward(response, gold) == want


def test_last_boxed_balanced():
    assert last_boxed("x \\boxed{a{b}c} y") == "a{b}c"
    assert last_boxed("\\boxed{a{b}") is None
    assert last_boxed("\\boxed{\\boxed{7}}") == "7"          # the last opening is the inner box


def test_bad_gold_raises():
    with pytest.raises(ValueError, match="gold"):
        arith_reward("\\boxed{1}", "one")


# ---------------------------------------------------------------- tokenizer and model
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer
    from fastupg.task.tiny import build_tokenizer
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def test_tokenizer_arith_one_token_per_char(tok):
    train, _ = generate_splits(ArithConfig(n_train=100, n_eval=0))
    for e in train:
        for text in (e["prompt"], e["solution"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text)
            assert tok.decode(ids) == text
    assert len(tok) <= 300


@pytest.mark.parametrize("text", [
    "Find $\\frac{1}{2} + \\sqrt{3}$ for all $x \\in \\mathbb{R}$.",
    "héllo wörld — ∑ ∫ π ≤ 😀 中文 e\u0301",                 # non-NFC combining accent kept as is
    "  leading spaces\n\ttab\r\nCRLF  ",
])
def test_tokenizer_roundtrip_any_text(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id is None or tok.unk_token_id not in ids


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "What is 1+2?"}]
    s = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert s == "<|bos|><|user|>What is 1+2?\n<|assistant|>"
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "\\boxed{3}"}], tokenize=False)
    assert full.endswith("<|assistant|>\\boxed{3}<|eos|>")
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == s
    assert {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} == {1, 2, 0}


def test_model_roundtrip_identical_logits(tmp_path, tok):
    from transformers import AutoModelForCausalLM
    from fastupg.task.tiny import build_tiny_model
    m = build_tiny_model(tmp_path, tok, size="micro", seed=5)
    assert (tmp_path / "model.safetensors").exists()
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert m2.config.tie_word_embeddings
    assert m2.get_output_embeddings().weight.data_ptr() == m2.get_input_embeddings().weight.data_ptr()
    x = torch.randint(0, len(tok), (2, 17), generator=torch.Generator().manual_seed(0))
    m.eval(), m2.eval()
    with torch.no_grad():
        a, b = m(x).logits, m2(x).logits
    assert a.std() > 0
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # seeds give different models, the same seed the same one
    m3 = build_tiny_model(None, tok, size="micro", seed=6)
    assert not torch.equal(m3.model.embed_tokens.weight, m.model.embed_tokens.weight)
    m4 = build_tiny_model(None, tok, size="micro", seed=5)
    assert torch.equal(m4.model.layers[0].mlp.up_proj.weight, m.model.layers[0].mlp.up_proj.weight)


def test_bad_size_raises(tok):
    from fastupg.task.tiny import build_tiny_model
    with pytest.raises(ValueError, match="size"):
        build_tiny_model(None, tok, size="huge")


def test_ensure_embedded_idempotent_and_atomic(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from fastupg.task import tiny
    task = ArithConfig(n_train=40, n_eval=8)
    out = tmp_path / "emb"
    # a crash mid-build leaves nothing that looks valid
    def boom(*a, **k):
        raise RuntimeError("crash")
    monkeypatch.setattr(tiny, "build_tiny_model", boom)
    with pytest.raises(RuntimeError):
        tiny.ensure_embedded(out, size="micro", task=task)
    assert not out.exists() and not list(tmp_path.iterdir())
    monkeypatch.undo()

    p = tiny.ensure_embedded(out, size="micro", task=task)
    man = json.loads((p / "embedded.json").read_text())
    assert len(read_jsonl(p / man["train"])) == 40 and len(read_jsonl(p / man["eval"])) == 8
    AutoTokenizer.from_pretrained(p / man["model"])
    AutoModelForCausalLM.from_pretrained(p / man["model"])
    mtime = (p / "model" / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_embedded(out, size="micro", task=task) == p         # cached, not rebuilt
    assert (p / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="built with"):
        tiny.ensure_embedded(out, size="micro", seed=1, task=task)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        tiny.ensure_embedded(tmp_path / "junk", size="micro", task=task)


def test_ensure_embedded_concurrent_builds(tmp_path):
    """Two workers building the same folder at once (reproduce.py --jobs 2 on a fresh machine): both succeed and
    get the one build that landed. Forced: every builder sees the folder missing at first, then waits until all
    have built before renaming into place."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from fastupg.task import tiny
    task = ArithConfig(n_train=40, n_eval=8)
    out = tmp_path / "emb"
    barrier = threading.Barrier(3)
    real = tiny.build_tiny_model

    def slow_build(*a, **k):
        r = real(*a, **k)
        barrier.wait(timeout=60)  # all three builds finished: now they race to rename
        return r

    tiny.build_tiny_model = slow_build
    try:
        with ThreadPoolExecutor(3) as ex:
            got = list(ex.map(lambda _: tiny.ensure_embedded(out, size="micro", task=task), range(3)))
    finally:
        tiny.build_tiny_model = real
    assert got == [out] * 3 and (out / "embedded.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["emb"]  # no temporary build left behind


# ---------------------------------------------------------------- base pretraining (partial competence)
def test_base_problems_mix_and_no_held_out_prompt():
    from fastupg.task.base import BaseRecipe, base_problems
    _, held = generate_splits(ArithConfig(n_train=0, n_eval=300))
    exclude = {e["prompt"] for e in held}
    recipe = BaseRecipe(n_problems=1000, mix=((1, 0.5), (2, 0.3), (3, 0.2)))
    pools = base_problems(recipe, exclude)
    assert len(pools[1]) == 110                      # level 1 has only 110 problems: all of them
    assert len(pools[2]) == 300 and len(pools[3]) == 200
    prompts = [e["prompt"] for rows in pools.values() for e in rows]
    assert len(set(prompts)) == len(prompts) and not set(prompts) & exclude
    assert all(e["difficulty"] == d for d, rows in pools.items() for e in rows)
    assert base_problems(recipe, exclude) == pools  # deterministic


def test_base_recipe_bad_values_raise():
    from fastupg.task.base import BaseRecipe
    for kw, name in ((dict(steps=-1), "steps"), (dict(batch_size=0), "batch_size"), (dict(learning_rate=0.0),
                     "learning_rate"), (dict(min_lr_ratio=0.0), "min_lr_ratio"), (dict(mix=((9, 1.0),)), "difficulty"),
                     (dict(mix=((1, 0.0),)), "weight")):
        with pytest.raises(ValueError, match=name):
            BaseRecipe(**kw)


def test_pretrain_learns_and_is_deterministic(tok):
    """A few steps of the base stage lower the loss on its own data, and the same recipe gives the same weights."""
    from fastupg.task.base import BaseRecipe, base_problems, pretrain
    from fastupg.task.tiny import build_tiny_model
    recipe = BaseRecipe(steps=12, batch_size=8, n_problems=40, warmup_steps=2, learning_rate=3e-3)
    pools = base_problems(recipe, set())
    models = [build_tiny_model(None, tok, size="micro", seed=0) for _ in range(2)]
    losses = [pretrain(m, tok, pools, recipe) for m in models]
    assert len(losses[0]) == 12 and sum(losses[0][-3:]) < sum(losses[0][:3])
    assert losses[0] == losses[1]
    assert torch.equal(models[0].model.embed_tokens.weight, models[1].model.embed_tokens.weight)
    assert pretrain(models[0], tok, pools, BaseRecipe(steps=0)) == []


def test_ensure_embedded_base_is_part_of_the_spec(tmp_path):
    from fastupg.task import tiny
    from fastupg.task.base import BaseRecipe
    task = ArithConfig(n_train=40, n_eval=8)
    base = BaseRecipe(steps=2, batch_size=4, n_problems=30, warmup_steps=1)
    out = tiny.ensure_embedded(tmp_path / "emb", size="micro", task=task, base=base)
    assert json.loads((out / "embedded.json").read_text())["spec"]["base"]["steps"] == 2
    with pytest.raises(ValueError, match="built with"):        # another base recipe never reuses this folder
        tiny.ensure_embedded(out, size="micro", task=task, base=BaseRecipe(steps=3, batch_size=4, n_problems=30))
    with pytest.raises(ValueError, match="built with"):
        tiny.ensure_embedded(out, size="micro", task=task)     # nor does the random model
    assert tiny.base_recipe("micro") is None and tiny.base_recipe("tiny").steps == tiny.BASE_RECIPES["tiny"].steps
    assert tiny.base_recipe("tiny", 7).steps == 7
    with pytest.raises(ValueError, match="size"):
        tiny.base_recipe("huge")


def test_embedded_root_changes_with_the_base_recipe(tmp_path):
    from fastupg.trainer import embedded_root
    roots = {embedded_root(str(tmp_path), "tiny", base_steps=s) for s in (-1, 0, 5)}
    assert len(roots) == 3
    assert embedded_root(str(tmp_path), "tiny") == embedded_root(str(tmp_path), "tiny", base_steps=-1)
