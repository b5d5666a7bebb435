"""Weights: lazy memory-mapped safetensors, sharded folders, dtype conversion, and clear
errors for missing, unexpected, mis-shaped or truncated tensors; hub ids offline."""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURES
from safetensors.numpy import load_file, save_file

import einplan
from einplan.formats.weights import WeightsError, load_weights

CASE = FIXTURES / "llama_mha_untied"


@pytest.fixture
def plan():
    return einplan.compile_model(CASE / "config.json")


def _copy_case(tmp_path, tensors):
    shutil.copy(CASE / "config.json", tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_weights_are_memory_mapped_not_copied(plan):
    """Norms and embeddings are views of the file; projections are packed copies."""
    arrays = load_weights(plan.entry(), CASE)
    for key in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        assert not arrays[key].flags.owndata and not arrays[key].flags.writeable


def test_projections_are_packed_transposed(plan):
    arrays = load_weights(plan.entry(), CASE)
    t = load_file(CASE / "model.safetensors")
    qkv = "+".join(f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv")
    want = np.concatenate([t[k].T for k in qkv.split("+")], axis=1)
    np.testing.assert_array_equal(arrays[qkv], want)


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path, plan):
    t = load_file(CASE / "model.safetensors")
    del t["model.norm.weight"]
    t["model.extra.weight"] = np.zeros(3, np.float32)
    t["lm_head.weight"] = np.zeros((7, 64), np.float32)
    folder = _copy_case(tmp_path, t)
    with pytest.raises(WeightsError) as e:
        load_weights(plan.entry(), folder)
    msg = str(e.value)
    assert "missing tensors: model.norm.weight" in msg
    assert "unexpected tensors: model.extra.weight" in msg
    assert "lm_head.weight: checkpoint [7, 64], plan [256, 64]" in msg


def test_truncated_checkpoint_is_refused(tmp_path, plan):
    shutil.copy(CASE / "config.json", tmp_path / "config.json")
    data = (CASE / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match="truncated"):
        load_weights(plan.entry(), tmp_path)


def test_bf16_checkpoint_converts_to_f32_plan(tmp_path, plan):
    t = load_file(CASE / "model.safetensors")
    bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}
    folder = _copy_case(tmp_path, bf)
    arrays = load_weights(plan.entry(), folder)
    w = arrays["model.embed_tokens.weight"]
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, bf["model.embed_tokens.weight"].astype(np.float32))


def test_bf16_weight_plan_runs_close_to_f32(plan):
    ref = load_file(CASE / "reference.safetensors")
    bf_plan = einplan.compile_model(CASE / "config.json", weight_dtype="bf16")
    session = einplan.Session(bf_plan, CASE)
    w = session.weights["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == ml_dtypes.bfloat16
    logits = session.forward(ref["input_ids"])
    assert logits.dtype == np.float32
    assert np.abs(logits - ref["logits"]).max() < 2e-2


def test_sharded_folder_with_index(tmp_path, plan):
    t = load_file(CASE / "model.safetensors")
    keys = sorted(t)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    for name, ks in shards.items():
        save_file({k: t[k] for k in ks}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ref = load_file(CASE / "reference.safetensors")
    logits = einplan.Session(plan, tmp_path).forward(ref["input_ids"])
    assert np.abs(logits - ref["logits"]).max() < 1e-4
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="shard named in the index is missing"):
        load_weights(plan.entry(), tmp_path)


def test_missing_path_and_offline_hub_id(monkeypatch, tmp_path, plan):
    with pytest.raises(WeightsError, match="not found"):
        load_weights(plan.entry(), tmp_path / "no-such-folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match="not in the local cache"):
        load_weights(plan.entry(), "nobody/no-such-model")


def test_session_needs_weights_or_an_explicit_random_seed(plan):
    with pytest.raises(ValueError, match="either weights or random_seed"):
        einplan.Session(plan)


def resident_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and first == "Rss:":
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_binding_leaves_no_file_pages_resident(tmp_path):
    """Binding reads every tensor (copies, the NaN check); the file's pages are then unmapped
    from the process, or RSS would count the weights twice."""
    path = tmp_path / "model.safetensors"  # a path no other test maps
    shutil.copy(CASE / "model.safetensors", path)
    plan = einplan.compile_model(CASE / "config.json")
    tensors = load_file(path)  # (a reference read, not mapped)
    bound = load_weights(plan.entry("forward"), tmp_path)
    assert resident_kib(path) == 0
    norm = "model.layers.0.input_layernorm.weight"
    assert np.array_equal(bound[norm], tensors[norm])  # a view of the file reads it back
    assert resident_kib(path) > 0


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_a_copied_tensor_drops_its_file_pages(tmp_path):
    """Binding drops each tensor's pages as soon as it is copied, so a weight is never held
    twice (copy and file pages) while the rest bind: the peak stays one copy."""
    from einplan.formats.weights import drop_file_pages, read_safetensors_index

    path = tmp_path / "model.safetensors"
    rng = np.random.default_rng(0)
    small = np.ones(10, np.float32)
    save_file({"a": small, "big": rng.standard_normal((1024, 1024), np.float32), "c": small}, path)
    arr = read_safetensors_index(path)["big"][0]
    copy = np.array(arr.T)  # reads its 4 MiB
    assert resident_kib(path) >= 4096
    drop_file_pages(arr)
    assert resident_kib(path) <= 128  # what the kernel mapped around the reads, at most
    assert np.array_equal(copy.T, arr)  # still readable: read back from the page cache
    drop_file_pages(np.ones(3))  # an array in memory: nothing to do
