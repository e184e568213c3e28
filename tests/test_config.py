"""The config loader: YAML + overrides into typed dataclasses, strict errors naming key and file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from model.config import PRESETS, ModelConfig
from orchestration.artifacts import RunDir, write_config
from orchestration.config import (
    ConfigError,
    FinetuneRunConfig,
    PretrainConfig,
    ScalingRunConfig,
    TuneRunConfig,
    config_to_dict,
    load_config,
    schema_of,
)

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg.model == ModelConfig()


def test_yaml_and_overrides_compose(tmp_path):
    path = write(tmp_path, "model:\n  n_layer: 3\n  n_embd: 96\n  n_head: 4\n")
    cfg = load_config(path, ["model.n_head=6", "model.dropout=1e-1", "model.pos_encoding=rope"])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head) == (3, 96, 6)
    assert cfg.model.dropout == pytest.approx(0.1)  # "1e-1" is a string in YAML 1.1; coerced
    assert cfg.model.pos_encoding == "rope"


def test_preset_fills_shape_and_explicit_keys_win(tmp_path):
    path = write(tmp_path, "model:\n  preset: gpt2-small\n  dropout: 0.1\n")
    cfg = load_config(path)
    assert cfg.model.n_embd == 768 and cfg.model.vocab_size == 50257 and cfg.model.dropout == 0.1
    cfg = load_config(path, ["model.n_layer=6"])
    assert cfg.model.n_layer == 6 and cfg.model.n_head == PRESETS["gpt2-small"]["n_head"]


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "model:\n  n_layers: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "model.n_layers" in msg and str(path) in msg and "did you mean 'model.n_layer'" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        load_config(write(tmp_path, "modle: {}\n"))


def test_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"model.n_layer.*expected int"):
        load_config(write(tmp_path, "model:\n  n_layer: three\n"))
    with pytest.raises(ConfigError, match=r"model.bias.*expected bool"):
        load_config(None, ["model.bias=1"])


def test_choice_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.norm=batchnorm"])
    assert "'layernorm'" in str(err.value) and "'rmsnorm'" in str(err.value)


def test_out_of_range_names_bounds():
    with pytest.raises(ConfigError, match=r"model.dropout.*out of range.*\[0.0, 0.99\]"):
        load_config(None, ["model.dropout=1.5"])
    with pytest.raises(ConfigError, match=r"model.n_layer.*out of range"):
        load_config(None, ["model.n_layer=0"])


def test_cross_field_check_is_a_config_error():
    with pytest.raises(ConfigError, match=r"n_embd \(100\) must be divisible by n_head \(3\)"):
        load_config(None, ["model.n_embd=100", "model.n_head=3"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="gpt2-small"):
        load_config(None, ["model.preset=gpt5"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["model.n_layer"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.preset=mini", "model.mlp=swiglu"])
    write_config(RunDir.at(str(tmp_path / "out")), config_to_dict(cfg))
    path = tmp_path / "out" / "config.yaml"
    assert yaml.safe_load(path.read_text())["model"]["mlp"] == "swiglu"
    assert load_config(path) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_with_their_commands_schema(path):
    schema = schema_of(path)
    assert isinstance(load_config(path, schema=schema), schema)


def test_each_command_refuses_sections_it_does_not_use(tmp_path):
    with pytest.raises(ConfigError, match=r"section 'tune' is not used by `raylm train"):
        load_config(write(tmp_path, "tune:\n  name: x\n"))
    with pytest.raises(ConfigError, match=r"section 'scaling' is not used by `raylm tune`"):
        load_config(write(tmp_path, "scaling: {}\n"), schema=TuneRunConfig)
    with pytest.raises(ConfigError, match=r"section 'tune' is not used by `raylm finetune`"):
        load_config(write(tmp_path, "tune: {}\n"), schema=FinetuneRunConfig)
    assert isinstance(load_config(write(tmp_path, "scaling: {}\n"), schema=ScalingRunConfig), ScalingRunConfig)


def test_finetune_schema_takes_only_dropout_and_refuses_pretraining_keys(tmp_path):
    cfg = load_config(None, ["model.dropout=0.1"], schema=FinetuneRunConfig)
    assert cfg.model.dropout == 0.1
    with pytest.raises(ConfigError, match=r"unknown key 'model.n_layer'"):
        load_config(None, ["model.n_layer=4"], schema=FinetuneRunConfig)
    with pytest.raises(ConfigError, match=r"train.data': fine-tuning reads finetune.data"):
        load_config(None, ["train.data=x.json"], schema=FinetuneRunConfig)
    with pytest.raises(ConfigError, match=r"train.val_sequences': fine-tuning scores finetune.max_val_examples"):
        load_config(None, ["train.val_sequences=24"], schema=FinetuneRunConfig)
    # a pretraining run takes the same keys
    assert load_config(None, ["train.val_sequences=24"], schema=PretrainConfig).train.val_sequences == 24


def test_binary_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(path)
