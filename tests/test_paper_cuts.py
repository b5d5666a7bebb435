"""Paper cuts: checkpoints ready for transformers, every step's loss kept for the plot,
samples printed safely, unsupported model types named."""

from __future__ import annotations

import json

import pytest
from test_train import CORPUS, MICRO

import einplan
from einplan.api import TRAIN_ENTRIES
from einplan.apps.training_run import RunOptions, TrainingRun, escape_control
from einplan.models.config import ConfigError, load_config
from einplan.report.training import every_step_loss


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    plan = einplan.compile_model(MICRO, entries=TRAIN_ENTRIES)
    run = TrainingRun(plan, RunOptions(CORPUS, out, steps=5, overrides={"log_every": 2}))
    run.run()
    return out


def test_checkpoint_has_the_files_transformers_generate_reads(run_folder):
    ckpt = sorted((run_folder / "checkpoints").glob("step-*"))[-1]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["eos_token_id"] is None  # a byte tokenizer has no eos: never []
    generation = json.loads((ckpt / "generation_config.json").read_text())
    assert "eos_token_id" not in generation and "bos_token_id" not in generation
    tk = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert tk["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tk["model_max_length"] == MICRO["max_position_embeddings"]
    assert tk["eos_token"] is None


def test_metrics_keep_every_steps_loss(run_folder):
    records = [json.loads(x) for x in (run_folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    assert [len(r["step_losses"]) for r in records] == [2, 2, 1]
    steps, losses = every_step_loss(records)
    assert steps == [1, 2, 3, 4, 5]
    assert losses[1] == records[0]["loss"] and losses[4] == records[2]["loss"]


def test_every_step_loss_reads_old_records():
    assert every_step_loss([{"step": 10, "loss": 2.0}]) == ([10], [2.0])


def test_samples_escape_control_characters():
    text = "a\x1b[2Jb\rc\nd\te\x07"
    assert escape_control(text) == "a\\x1b[2Jb\\rc\nd\te\\x07"


@pytest.mark.parametrize("model_type", ["gpt2", "deepseek_v3"])
def test_unsupported_model_type_is_named(model_type):
    raw = {"model_type": model_type, "n_embd": 768, "n_layer": 12, "vocab_size": 50257}
    with pytest.raises(
        ConfigError,
        match=rf"model_type '{model_type}' is not supported "
        r"\(supported: llama, mistral, qwen2, mixtral, qwen2_moe\)",
    ):
        load_config(raw)
