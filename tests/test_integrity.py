"""Bad input is refused by name: checkpoints read anywhere are checked against a manifest that
is itself hashed, torn metrics lines, non-finite weights never written into a checkpoint, and
plans whose checksum is valid but whose graphs are broken."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
from conftest import FIXTURES, ONE_LAYER
from gguf_fixture import write_gguf
from test_train import new_run, plan  # noqa: F401  (the module-scoped plan fixture)

import einplan
from einplan.cli import main
from einplan.compiler.plan import PlanError, checksum
from einplan.errors import EinplanError
from einplan.formats.checkpoint import CheckpointError, load_checkpoint
from einplan.formats.gguf import GGUFError, read_gguf, read_gguf_tensors
from einplan.formats.weights import WeightsError, load_weights, read_safetensors_index
from einplan.models.config import ConfigError, parse_config
from einplan.models.train_config import parse_train_config
from einplan.runtime.sampling import SamplingConfig


@pytest.fixture(scope="module")
def run_dir(plan, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("run")
    new_run(plan, out).run(3)
    return out


def copy_checkpoint(run_dir, tmp_path):
    """A copy of the run's latest checkpoint folder, to damage."""
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(load_checkpoint(run_dir / "checkpoints").path, folder)
    return folder


def edit_manifest(folder, change):
    manifest = folder / "trainer.json"
    state = json.loads(manifest.read_text())
    change(state)
    manifest.write_text(json.dumps(state))
    return manifest


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.update(files={}),
        lambda s: s.update(step=99),
        lambda s: s["counters"].update(step=99),
    ],
    ids=["emptied-file-list", "edited-step", "edited-counters"],
)
def test_an_edited_manifest_is_refused(run_dir, tmp_path, change):
    manifest = edit_manifest(copy_checkpoint(run_dir, tmp_path), change)
    with pytest.raises(CheckpointError, match=f"{manifest}.*edited or damaged"):
        load_checkpoint(manifest.parent)


def test_an_old_checkpoint_version_is_refused_with_what_to_do(run_dir, tmp_path):
    manifest = edit_manifest(copy_checkpoint(run_dir, tmp_path), lambda s: s.update(version=1))
    with pytest.raises(CheckpointError, match=f"{manifest}.*version 1.*plain weights"):
        load_checkpoint(manifest.parent)


def test_checkpoints_are_verified_wherever_they_are_read(plan, run_dir, tmp_path, capsys):  # noqa: F811
    folder = copy_checkpoint(run_dir, tmp_path)
    ids = np.arange(8)[None]
    einplan.Session(plan, folder).forward(ids)  # intact: loads
    model = folder / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit the safetensors reader cannot see
    model.write_bytes(bytes(data))
    for source in (folder, model):
        with pytest.raises(CheckpointError, match=f"{model}.*SHA-256"):
            einplan.Session(plan, source)
    plan_file = tmp_path / "plan.json"
    plan.save(plan_file)
    for argv in (
        ["eval", str(plan_file), "--weights", str(folder), "--max-tokens", "32", "--window", "8"],
        [
            "run",
            str(plan_file),
            "--weights",
            str(folder),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ],
    ):
        assert main(argv) == 2, argv
        assert "SHA-256" in capsys.readouterr().err


def test_a_checkpoints_root_means_its_latest_and_is_verified(plan, run_dir, tmp_path):  # noqa: F811
    import shutil

    root = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", root, symlinks=True)
    einplan.Session(plan, root)
    edit_manifest(load_checkpoint(root).path, lambda s: s.update(step=7))
    with pytest.raises(CheckpointError, match="trainer.json.*edited"):
        einplan.Session(plan, root)


def test_non_finite_weights_are_never_checkpointed(plan, tmp_path):  # noqa: F811
    run = new_run(plan, tmp_path)
    run.run(3)
    key = next(iter(run.trainer.trained))
    run.trainer.weights[key][0] = np.nan
    with pytest.raises(
        CheckpointError, match=f"step 3: non-finite values in model.safetensors:{key}"
    ):
        run.checkpoint()
    assert load_checkpoint(tmp_path / "checkpoints").state["counters"]["step"] == 3
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_a_torn_last_metrics_line_is_dropped_and_one_before_it_refused(plan, tmp_path):  # noqa: F811
    new_run(plan, tmp_path).run(4)
    log = tmp_path / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines) + '\n{"step": 5, "lo')
    with pytest.warns(UserWarning, match="torn last line"):
        resumed = new_run(plan, tmp_path, resume=True)
    assert [r["step"] for r in resumed.metrics.records] == [2, 4]
    assert log.read_text().splitlines() == lines
    log.write_text(lines[0][:20] + "\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(EinplanError, match=f"{log}: line 1 is damaged"):
        new_run(plan, tmp_path, resume=True)


def rewrite_plan(path, change):
    """Edit a saved plan's body and give it a valid checksum again."""
    doc = json.loads(path.read_text())
    change(doc["body"])
    doc["checksum"] = checksum(doc["body"])
    path.write_text(json.dumps(doc))


def forward_nodes(body):
    return body["entries"]["forward"]["nodes"]


def set_node(i, key, value):
    return lambda body: forward_nodes(body)[i].update({key: value})


def first_op(body, op):
    return next(i for i, n in enumerate(forward_nodes(body)) if n["op"] == op)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: set_node(first_op(b, "rms_norm"), "shape", [1, 2, 3])(b), "recorded f32"),
        (lambda b: set_node(first_op(b, "rms_norm"), "op", "softmax")(b), r"node %\d+"),
        (lambda b: set_node(first_op(b, "rms_norm"), "in", [99999])(b), "used before"),
        (lambda b: set_node(first_op(b, "rms_norm"), "op", "frobnicate")(b), "unknown op"),
        (lambda b: set_node(0, "tags", ["sparkly"])(b), "unknown tag"),
        (lambda b: set_node(0, "id", "zero")(b), "node id must be int"),
        (lambda b: set_node(0, "in", {"a": 1})(b), "inputs must be list"),
        (lambda b: b["entries"].update(forward=[1, 2]), "the entry must be dict"),
        (lambda b: forward_nodes(b)[0].pop("dtype"), "missing field 'dtype'"),
        (lambda b: b.update(entries=[]), "entries must be objects"),
    ],
    ids=[
        "shape",
        "op",
        "inputs",
        "unknown-op",
        "unknown-tag",
        "str-id",
        "dict-inputs",
        "list-entry",
        "no-dtype",
        "list-entries",
    ],
)
def test_a_plan_with_a_valid_checksum_is_still_verified(tmp_path, change, message):
    path = tmp_path / "p.plan"
    einplan.compile_model(ONE_LAYER).save(path)
    rewrite_plan(path, change)
    with pytest.raises(PlanError, match=f"{path}.*{message}") as e:
        einplan.load_plan(path)
    if "entries must" not in message:
        assert "entry 'forward'" in str(e.value)


def safetensors_with_header(path, header, data=b"\0" * 24):
    """A .safetensors file of a given (possibly malformed) JSON header and data bytes."""
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


TENSOR = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}


@pytest.mark.parametrize(
    "header, data, field",
    [
        ([1, 2], b"", "sequence"),
        (5, b"", "integer"),
        ({"w": {"dtype": "F32", "shape": [2, 3]}}, b"\0" * 24, "data_offsets"),
        ({"w": {**TENSOR, "data_offsets": [-4, 20]}}, b"\0" * 24, "-4"),
        ({"w": {**TENSOR, "data_offsets": [0, 48]}}, b"\0" * 24, "offset"),
        ({"w": {**TENSOR, "shape": [-2, 3]}}, b"\0" * 24, "-2"),
        ({"w": {**TENSOR, "shape": [2, 2]}}, b"\0" * 24, "shape"),
        ({"w": {**TENSOR, "dtype": "Q4"}}, b"\0" * 24, "Q4"),
        ({"w": TENSOR}, b"\0" * 20, "not fully covered"),
    ],
    ids=[
        "list",
        "number",
        "no-offsets",
        "neg-offset",
        "past-end",
        "neg-shape",
        "size",
        "dtype",
        "short",
    ],
)
def test_malformed_safetensors_headers_are_named(tmp_path, header, data, field):
    path = safetensors_with_header(tmp_path / "model.safetensors", header, data)
    with pytest.raises(WeightsError, match=f"{path}: not a valid safetensors file.*{field}"):
        read_safetensors_index(path)
    with pytest.raises(WeightsError, match=str(path)):
        load_weights(einplan.compile_model(ONE_LAYER).entry(), tmp_path)


def test_a_directory_for_a_safetensors_file_is_named(tmp_path):
    folder = tmp_path / "model.safetensors"
    folder.mkdir()
    with pytest.raises(WeightsError, match=f"{folder}: not a file"):
        read_safetensors_index(folder)


def test_an_unsupported_but_valid_dtype_is_named(tmp_path):
    path = safetensors_with_header(
        tmp_path / "m.safetensors",
        {"w": {**TENSOR, "dtype": "U16", "data_offsets": [0, 12]}},
        b"\0" * 12,
    )
    with pytest.raises(WeightsError, match=f"{path}: tensor w has unsupported dtype U16"):
        read_safetensors_index(path)


@pytest.mark.parametrize("cut", [100, 0.5], ids=["tail", "half"])
def test_a_truncated_gguf_is_refused_by_name(tmp_path, cut):
    good = write_gguf(FIXTURES / "llama_gqa_tied", tmp_path / "good.gguf")
    data = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:-cut] if isinstance(cut, int) else data[: int(len(data) * cut)])
    with pytest.raises(GGUFError, match=f"{bad}: not a readable GGUF file, or truncated"):
        read_gguf_tensors(bad)


def test_a_gguf_without_a_size_field_names_it(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setattr(gguf.GGUFWriter, "add_head_count", lambda self, n: None)
    bad = write_gguf(FIXTURES / "llama_gqa_tied", tmp_path / "nohead.gguf")
    with pytest.raises(
        GGUFError, match=f"{bad}: GGUF metadata 'llama.attention.head_count' is missing"
    ):
        read_gguf(bad)


def test_non_finite_weights_are_reported_on_load_by_tensor(plan, run_dir, tmp_path):  # noqa: F811
    from safetensors.numpy import load_file, save_file

    tensors = load_file(load_checkpoint(run_dir / "checkpoints").path / "model.safetensors")
    tensors["model.norm.weight"][3] = np.inf
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="NaN or infinite values in model.norm.weight"):
        einplan.Session(plan, tmp_path)


@pytest.mark.parametrize("key", ["rms_norm_eps", "rope_theta"])
def test_non_finite_model_config_values_are_refused(key):
    with pytest.raises(ConfigError, match=f"{key}.* finite"):
        parse_config({**ONE_LAYER, key: float("nan")})


@pytest.mark.parametrize("key", ["lr", "min_lr", "beta1", "grad_clip"])
def test_non_finite_train_values_are_refused(key):
    with pytest.raises(ConfigError, match=f"train key '{key}' must be finite"):
        parse_train_config({key: float("nan")})


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
def test_non_finite_sampling_values_are_refused(field):
    with pytest.raises(EinplanError, match=f"{field} must be a finite number"):
        SamplingConfig(**{field: float("nan")})


def test_a_non_finite_learning_rate_stops_before_any_update(plan, tmp_path):  # noqa: F811
    run = new_run(plan, tmp_path)
    before = {k: np.array(v) for k, v in run.trainer.trained_weights().items()}
    run.trainer.cfg = dataclasses.replace(run.cfg, lr=float("inf"))
    with pytest.raises(EinplanError, match="learning rate of step 1 is"):
        run.run(3)
    for k, v in run.trainer.trained_weights().items():
        assert np.array_equal(v, before[k]), k
    assert not (tmp_path / "checkpoints").exists()


def test_a_plan_with_a_non_finite_number_is_refused(tmp_path):
    path = tmp_path / "p.plan"
    einplan.compile_model(ONE_LAYER).save(path)
    text = path.read_text()
    doc = json.loads(text)
    rope = next(n for n in doc["body"]["entries"]["forward"]["nodes"] if n["op"] == "rope_table")
    key = next(k for k, v in rope["attrs"].items() if isinstance(v, float | list))
    rope["attrs"][key] = float("inf")
    path.write_text(json.dumps(doc))  # json writes Infinity, which is not JSON
    with pytest.raises(PlanError, match="non-finite number Infinity"):
        einplan.load_plan(path)


@pytest.mark.parametrize("eps", [1e-320, 0.0, 1.0, 1e308])  # vanishes in float32; swamps x^2
def test_an_rms_eps_outside_its_useful_range_is_refused(eps):
    with pytest.raises(ConfigError, match=r"rms_norm_eps must lie in \[1.18e-38, 1\)"):
        parse_config({**ONE_LAYER, "rms_norm_eps": eps})


@pytest.mark.parametrize("key", ["max_position_embeddings", "num_hidden_layers", "vocab_size"])
def test_a_zero_size_is_refused(key):
    with pytest.raises(ConfigError, match=f"{key} must be at least 1, got 0"):
        parse_config({**ONE_LAYER, key: 0})


@pytest.mark.parametrize(
    "patch, field",
    [
        ("add_token_types", "'tokenizer.ggml.token_type' has 10 entries for 256 tokens"),
        ("add_eos_token_id", "'tokenizer.ggml.eos_token_id' is 999, outside the vocabulary"),
    ],
)
def test_gguf_tokenizer_fields_that_disagree_are_named(tmp_path, monkeypatch, patch, field):
    import gguf

    original = getattr(gguf.GGUFWriter, patch)
    wrong = [1] * 10 if patch == "add_token_types" else 999
    monkeypatch.setattr(gguf.GGUFWriter, patch, lambda self, _: original(self, wrong))
    bad = write_gguf(FIXTURES / "llama_gqa_tied", tmp_path / "bad.gguf")
    with pytest.raises(GGUFError, match=field):
        read_gguf(bad)


def test_a_gguf_without_its_rms_epsilon_is_refused(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setattr(gguf.GGUFWriter, "add_layer_norm_rms_eps", lambda self, eps: None)
    bad = write_gguf(FIXTURES / "llama_gqa_tied", tmp_path / "noeps.gguf")
    with pytest.raises(GGUFError, match="'llama.attention.layer_norm_rms_epsilon' is missing"):
        read_gguf(bad)


@pytest.mark.parametrize(
    "key, value", [("vocab_size", "8"), ("rms_norm_eps", -1.0), ("hidden_size", 0), ("bogus", 1)]
)
def test_a_plan_whose_model_config_was_edited_is_refused(tmp_path, key, value):
    path = tmp_path / "p.plan"
    einplan.compile_model(ONE_LAYER).save(path)
    rewrite_plan(path, lambda body: body["config"].__setitem__(key, value))
    with pytest.raises(PlanError, match="the plan's model config is damaged"):
        einplan.Session(path, random_seed=0)


def test_train_reads_a_plan_rewritten_with_whitespace_and_checks_its_config(tmp_path, capsys):
    from einplan.api import TRAIN_ENTRIES
    from einplan.compiler.plan import is_plan_file

    path = tmp_path / "t.plan"
    einplan.compile_model(ONE_LAYER, entries=TRAIN_ENTRIES).save(path)
    rewrite_plan(path, lambda body: body["config"].__setitem__("vocab_size", "8"))
    assert path.read_text().startswith('{"magic": ')  # json.dumps' spacing, not Plan.save's
    assert is_plan_file(path) and not is_plan_file(FIXTURES / "llama_gqa_tied" / "config.json")
    data = str(FIXTURES.parent.parent / "einplan" / "data" / "shakespeare_sample.txt")
    assert main(["train", str(path), "--data", data, "--out", str(tmp_path / "r")]) == 2
    assert "the plan's model config is damaged" in capsys.readouterr().err
