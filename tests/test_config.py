"""Configuration: every recipe validates; unknown keys, wrong types and impossible combinations are
rejected before any work starts, with the key named."""
from pathlib import Path

import pytest

from fastupg.config import TrainConfig, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_recipes_exist():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "hpt-paper", "hpt-official", "sft", "grpo", "sft-then-grpo", "luffy", "srft"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_recipe_validates(path):
    cfg = load_config(path)
    for st in cfg.stage_configs():
        st.estimator()


def test_official_and_paper_hpt_differ_as_documented():
    paper = load_config(CONFIGS[0].parent / "hpt-paper.yaml").estimator()
    off = load_config(CONFIGS[0].parent / "hpt-official.yaml").estimator()
    assert paper.online.mask == "clip" and paper.adv_std and paper.agg == "token-mean"
    assert off.online.mask == "none" and not off.adv_std
    assert (off.agg, off.agg_norm, off.offline_agg, off.entropy_coef) == ("token-sum-norm", 8192, "token-mean", 0.001)


def test_overrides_and_types():
    cfg = load_config(None, ["loss_type=dapo", "learning_rate=1e-5", "report_to=jsonl,tensorboard", "epsilon_high=0.3"])
    assert cfg.learning_rate == 1e-5 and cfg.report_to == ("jsonl", "tensorboard")
    assert cfg.estimator().eps_high == 0.3 and cfg.estimator().eps_low == 0.2
    assert load_config(None, ["loss_type=grpo", "epsilon=0.1"]).estimator().eps_high == 0.1   # TRL default
    assert parse_overrides(["--max-steps=3"]) == {"max_steps": 3}
    with pytest.raises(TypeError, match="max_steps"):
        load_config(None, ["max_steps=1.5"])
    with pytest.raises(TypeError, match="learning_rate"):
        load_config(None, ["learning_rate=fast"])


@pytest.mark.parametrize("overrides,match", [
    (["lerning_rate=1e-3"], "did you mean 'learning_rate'"),
    (["num_generation=4"], "did you mean 'num_generations'"),
    (["loss_type=grpoo"], "did you mean 'grpo'"),
    (["loss_type=ppo"], "value model"),
    (["num_generations=3"], "num_generations"),
    (["loss_type=grpo", "num_generations=1", "per_device_train_batch_size=4"], "num_generations must be >= 2"),
    (["loss_type=grpo", "hpt_mode=soft"], "hpt_mode"),
    (["loss_type=grpo", "offline_coef=0.5"], "offline_coef"),
    (["loss_type=sft", "online_clip=false"], "online_clip"),
    (["epsilon=-1"], "eps_low"),
    (["hpt_gate=1.0"], "hpt_gate"),
    (["hpt_offline=rl"], "hpt_offline"),
    (["loss_type=grpo", "hpt_offline=offpolicy"], "hpt_offline"),
    (["report_to=mlflow"], "report_to"),
    (["agg=token_mean"], "did you mean 'token-mean'"),
    (["max_steps=0"], "max_steps"),
    (["stages=[{loss_type: sft, max_stepz: 3}]"], "stages\\[0\\].*max_stepz"),
    (["stages=[{loss_type: grpo, num_generations: 3}]"], "stages\\[0\\].*num_generations"),
])
def test_bad_configs_name_the_key(overrides, match):
    with pytest.raises((ValueError, TypeError), match=match):
        load_config(None, overrides)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(p)
    with pytest.raises(ValueError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("learning_rate: 1e-3\nbogus_key: 1\n")
    with pytest.raises(ValueError, match="bogus_key"):
        load_config(p)


def test_config_is_frozen_and_derives_batch():
    cfg = TrainConfig(loss_type="hpt", num_generations=4, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    assert cfg.prompts_per_step == 4
    assert TrainConfig(loss_type="sft", per_device_train_batch_size=8).prompts_per_step == 8
    with pytest.raises(Exception):
        cfg.learning_rate = 1.0


def test_hpt_offpolicy_replaces_sft_by_luffy_branch():
    """Table 5's ablation: failed prompts get LUFFY's off-policy RL (pi_ref = 1, mixed-group advantage, shaping)."""
    sft = load_config(None, ["loss_type=hpt"]).estimator()
    off = load_config(None, ["loss_type=hpt", "hpt_offline=offpolicy", "luffy_gamma=0.2"]).estimator()
    assert sft.offline.ref == "policy" and sft.offline.advantage == "one"
    assert (off.offline.ref, off.offline.advantage, off.gamma) == ("one", "mixed", 0.2)
    assert off.online == sft.online  # the RL branch on solved prompts is unchanged
