"""`fastupg plan`: the memory budget from shapes only (nothing loaded), refusals with exit 2 and one stderr line."""
import json
from pathlib import Path

import pytest

from fastupg import plan as P
from fastupg.cli import main

CONFIGS = str(Path(__file__).resolve().parent.parent / "configs") + "/"


def test_shapes_of_the_recipes_models_give_their_parameter_counts():
    # published sizes: Qwen2.5-Math-1.5B 1.54 B, Qwen2.5-Math-7B 7.62 B, Llama-3.1-8B 8.03 B
    assert P.model_shape("Qwen/Qwen2.5-Math-1.5B").params == pytest.approx(1.54e9, rel=0.01)
    assert P.model_shape("Qwen/Qwen2.5-Math-7B").params == pytest.approx(7.62e9, rel=0.01)
    assert P.model_shape("meta-llama/Llama-3.1-8B").params == pytest.approx(8.03e9, rel=0.01)
    with pytest.raises(ValueError, match="built-in table"):
        P.model_shape("someone/unknown-model")


def test_local_config_json_wins(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)))
    s = P.model_shape(str(tmp_path))
    assert s.source.endswith("config.json") and s.vocab_size == 1000 and not s.qkv_bias
    # embeddings + head + norm, 2 layers of (q, o: 64x64; k, v: 64x32; mlp 3 x 64x128; 2 norms)
    assert s.params == 2 * 1000 * 64 + 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64)


@pytest.mark.parametrize("recipe", ["qwen2.5-math-7b-hpt", "qwen2.5-math-1.5b-hpt", "llama-3.1-8b-hpt"])
def test_recipes_fit_on_8x80(recipe, capsys):
    assert main(["plan", "--config", CONFIGS + recipe + ".yaml"]) == 0
    out = capsys.readouterr().out
    for row in ("parameters", "gradients", "Adam state", "activations", "loss chunk", "vLLM", "fits"):
        assert row in out


def test_sharding_divides_the_static_state():
    from fastupg.config import load_config
    cfg = load_config(CONFIGS + "qwen2.5-math-7b-hpt.yaml", [])
    shape = P.model_shape(cfg.model)
    one, eight = P.budget(cfg, shape, 1, 80), P.budget(cfg, shape, 8, 80)
    get = lambda b, k: dict(b.rows)[k]  # noqa: E731
    for k in ("parameters", "gradients", "Adam state"):
        assert get(one, k) == pytest.approx(8 * get(eight, k))
    assert get(eight, "Adam state") == pytest.approx(shape.params * 8 / 8)


def test_refusals_are_one_line_exit_2(capsys):
    # the 7B recipe on one 80 GB GPU cannot fit (fp32 weights + grads + Adam alone are 16 bytes x 7.6 B)
    assert main(["plan", "--config", CONFIGS + "qwen2.5-math-7b-hpt.yaml", "--gpus", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastupg plan: does not fit:")
    # the model's own 4k context without the recipe's override
    assert main(["plan", "--config", CONFIGS + "qwen2.5-math-7b-hpt.yaml", "max_position_embeddings=null"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exceeds the model's context 4096" in err[0]
    # bad arguments and an unknown model: one line, exit 2, nothing loaded
    assert main(["plan", "--config", CONFIGS + "qwen2.5-math-7b-hpt.yaml", "--gpus", "0"]) == 2
    assert main(["plan", "--config", CONFIGS + "qwen2.5-math-7b-hpt.yaml", "model=nobody/nothing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("fastupg plan: ") for e in err)


def test_one_gpu_plan_for_the_15b_recipe(capsys):
    assert main(["plan", "--config", CONFIGS + "qwen2.5-math-1.5b-hpt.yaml", "--gpus", "1"]) == 0
    assert "1 x 80 GB" in capsys.readouterr().out


def test_the_embedded_demo_plans_on_one_gpu(capsys):
    assert main(["plan", "--config", CONFIGS + "demo.yaml", "--gpus", "1"]) == 0
    assert "embedded" in capsys.readouterr().out
