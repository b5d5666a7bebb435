"""Configs: strict keys and types, HF layouts (old rope_theta/rope_scaling and new
rope_parameters), built-in names."""

from __future__ import annotations

import json

import pytest
from conftest import CASES, FIXTURES

from einplan.models.config import ConfigError, load_config, parse_config
from einplan.models.llama import rope_inv_freq

BASE = {
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
}


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="unknown config key 'num_hiden_layers'"):
        parse_config({**BASE, "num_hiden_layers": 2})


@pytest.mark.parametrize(
    "key, value",
    [
        ("hidden_size", "16"),
        ("num_hidden_layers", 1.5),
        ("tie_word_embeddings", 1),
        ("hidden_size", True),
        ("rms_norm_eps", "1e-5"),
        ("hidden_size", -16),
    ],
)
def test_ill_typed_key_is_an_error_naming_it(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        parse_config({**BASE, key: value})


def test_missing_key_and_bad_head_split():
    with pytest.raises(ConfigError, match="missing config key.*vocab_size"):
        parse_config({k: v for k, v in BASE.items() if k != "vocab_size"})
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        parse_config({**BASE, "num_key_value_heads": 3})


def test_unsupported_features_are_refused():
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        parse_config({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="hidden_act"):
        parse_config({**BASE, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        parse_config({**BASE, "model_type": "gpt2"})


@pytest.mark.parametrize("case", CASES)
def test_fixture_hf_configs_load(case):
    cfg = load_config(FIXTURES / case / "config.json")
    assert cfg.hidden_size == 64


def test_old_and_new_rope_layouts_agree():
    old = parse_config(
        {
            **BASE,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        }
    )
    new = parse_config(
        {
            **BASE,
            "rope_parameters": {
                "rope_theta": 500000.0,
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        }
    )
    assert old == new
    plain = parse_config({**BASE, "rope_theta": 500000.0})
    assert rope_inv_freq(old) != rope_inv_freq(plain)


def test_mistral_head_dim_and_qwen2_biases():
    assert load_config(FIXTURES / "mistral_head_dim" / "config.json").head_dim == 32
    assert load_config(FIXTURES / "qwen2_bias_mqa" / "config.json").qkv_bias


def test_builtin_names_and_folders(tmp_path):
    assert load_config("tiny").num_hidden_layers == 4
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    assert load_config(tmp_path).vocab_size == 32
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
