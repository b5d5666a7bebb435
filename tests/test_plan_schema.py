"""A plan file is checked field by field on load (issue #12, found by the fuzz report at 200
cases per class): annotation types, the liveness and buffers of the memory pass's schedule,
entry dims, op arity and attr types, lowering recipes; and weights and checkpoints that would
have been read wrongly: integer tensors for float weights, a ``latest`` that is no link."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from conftest import FIXTURES, ONE_LAYER
from test_integrity import rewrite_plan, run_dir  # noqa: F401  (module-scoped fixture)
from test_train import plan  # noqa: F401

import einplan
from einplan.api import TRAIN_ENTRIES
from einplan.cli import main
from einplan.compiler.plan import PlanError
from einplan.formats.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from einplan.formats.gguf import GGUFError, read_gguf, read_gguf_tensors
from einplan.formats.weights import WeightsError, load_weights
from einplan.models.config import ConfigError, parse_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "one.plan"
    einplan.compile_model(ONE_LAYER).save(path)
    return path


def entry(body, name="forward"):
    return body["entries"][name]


def nodes(body, name="forward"):
    return entry(body, name)["nodes"]


def node(body, op, name="forward"):
    return next(n for n in nodes(body, name) if n["op"] == op)


def ann(body, node_id, name="forward"):
    return entry(body, name)["annotations"][str(node_id)]


def steps(body, name="forward"):
    """The computed nodes of an entry with their annotations, in step order."""
    a = entry(body, name)["annotations"]
    return [(n, a[str(n["id"])]) for n in nodes(body, name) if str(n["id"]) in a]


def freed_twice(body):
    first = next(a for _, a in steps(body) if a["free_after"])
    later = [a for _, a in steps(body)][-1]
    later["free_after"] = [*later["free_after"], first["free_after"][0]]


def freed_early(body):
    """Free a value at the step that computes it, though later steps read it."""
    n, a = next((n, a) for n, a in steps(body) if n["op"] == "rms_norm")
    a["free_after"] = [*a["free_after"], n["id"]]


def live_slot(body):
    """Give a step the buffer of an earlier value that a later step still reads."""
    order = [n for n, _ in steps(body)]
    last_read = {}
    for k, n in enumerate(order):
        for i in n["in"]:
            last_read[i] = k
    for k, (n, a) in enumerate(steps(body)):
        for m, b in steps(body)[k + 1 :]:
            later = last_read.get(n["id"], -1) > order.index(m)
            same = m["shape"] == n["shape"] and m["dtype"] == n["dtype"]
            if a["slot"] is not None and b["slot"] is not None and later and same:
                if b["slot"] != a["slot"]:
                    b["slot"] = a["slot"]
                    return
    raise AssertionError("no such pair")


def wrong_recipe(body):
    """A valid permutation, but not the one the spec lowers to."""
    recipes = [n["attrs"]["recipe"] for n in nodes(body) if "recipe" in n.get("attrs", {})]
    r = next(r for r in recipes if r["kind"] == "matmul" and r["b_perm"] != r["b_perm"][::-1])
    r["b_perm"] = r["b_perm"][::-1]


def rope_to_param(body):
    n = node(body, "rope")
    n.update(op="param", attrs={"key": "x"}, name="x")


def param_to_state(body):
    """A plain param (only a key) turned into a state leaf: the same attrs, another role."""
    n = next(n for n in nodes(body) if n["op"] == "param" and list(n["attrs"]) == ["key"])
    n["op"] = "state"


def level_below_input(body):
    n, a = steps(body)[-1]
    a["level"] = 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: entry(b)["annotations"].update({"5": 2.5}), "annotations.5 must be dict"),
        (lambda b: ann(b, node(b, "rms_norm")["id"]).update(level="x"), "level must be int"),
        (lambda b: ann(b, node(b, "rms_norm")["id"]).update(slot=10**6), "not one of the"),
        (freed_twice, "already freed"),
        (freed_early, "read later"),
        (live_slot, "still holds live value"),
        (level_below_input, "not above|levels in step order"),
        (lambda b: entry(b)["dims"].update(batch=0), "dims.batch must be at least 1"),
        (lambda b: entry(b)["dims"].update(seq=None), "dims.seq must be int"),
        (lambda b: entry(b)["dims"].update(seq=128), "dims.seq is 128, but the plan's config"),
        (lambda b: node(b, "rms_norm")["attrs"].update(eps={"k": 1}), "'eps' must be a posit"),
        (lambda b: node(b, "rms_norm")["attrs"].update(epsilon=1e-5), "unknown attr"),
        (lambda b: node(b, "param")["attrs"].update(key={}), "'key' must be a string"),
        (rope_to_param, "op param takes 0 input"),
        (lambda b: node(b, "add")["in"].append(node(b, "add")["in"][0]), "takes 2 input"),
        (wrong_recipe, "is not the lowering"),
        (lambda b: ann(b, node(b, "rms_norm")["id"]).update(thread=10**6), "numbered 0, 1"),
        (param_to_state, "state with key"),
        (
            lambda b: node(b, "einsum")["attrs"]["recipe"].update(kind="bogus"),
            "recipe kind 'bogus'",
        ),
    ],
    ids=[
        "annotation-type",
        "level-type",
        "slot-range",
        "freed-twice",
        "freed-early",
        "live-slot",
        "level-order",
        "dims-zero",
        "dims-null",
        "dims-past-config",
        "eps-type",
        "unknown-attr",
        "key-type",
        "leaf-with-inputs",
        "arity",
        "recipe",
        "thread-number",
        "param-as-state",
        "recipe-kind",
    ],
)
def test_an_inconsistent_plan_is_refused_by_entry_and_field(saved, tmp_path, change, message):
    path = tmp_path / "p.plan"
    shutil.copy(saved, path)
    rewrite_plan(path, change)
    with pytest.raises(PlanError, match=f"{path}: entry 'forward'.*({message})"):
        einplan.load_plan(path)


def test_every_kind_of_compiled_plan_passes_its_own_checks(tmp_path):
    """Quantised (stored integers, static scales, zero points), LoRA and training plans:
    whatever the passes write, the loader's checks accept."""
    cfg = {**ONE_LAYER, "intermediate_size": 64, "hidden_size": 64}
    for kw in (
        {"quant": {"scheme": "w4a4", "group_size": 32, "activations": "static"}},
        {"quant": {"scheme": "w4a16", "group_size": 32, "symmetric": False}},
        {"quant": "w8a16", "lora": "r=2,alpha=4,targets=q,v", "entries": TRAIN_ENTRIES},
        {"lora": "r=2,alpha=4,targets=q,v,lm_head,dropout=0.1", "entries": TRAIN_ENTRIES},
    ):
        path = tmp_path / "q.plan"
        einplan.compile_model({**cfg, "train": {"seq_len": 8}}, **kw).save(path)
        einplan.load_plan(path)


def test_an_integer_tensor_for_a_float_weight_is_refused(tmp_path):
    """Same size as float32, so the file reads; the values would be converted silently."""
    folder = tmp_path / "w"
    shutil.copytree(FIXTURES / "llama_gqa_tied", folder)
    st = folder / "model.safetensors"
    data = st.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    key = "model.layers.0.mlp.up_proj.weight"
    header[key]["dtype"] = "I32"
    raw = json.dumps(header).encode()
    st.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    graph = einplan.compile_model(folder / "config.json").entry()
    with pytest.raises(WeightsError, match=f"float weights.*{key}: checkpoint int32, plan f32"):
        load_weights(graph, folder)


def test_a_latest_that_is_a_folder_is_refused_before_anything_is_written(
    run_dir,  # noqa: F811
    tmp_path,
):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, symlinks=True)
    root = run / "checkpoints"
    latest = root / "latest"
    target = latest.resolve()
    latest.unlink()
    shutil.copytree(target, latest)
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(CheckpointError, match="latest is a folder, not the symlink"):
        load_checkpoint(root)
    with pytest.raises(CheckpointError, match="latest is a folder"):
        save_checkpoint(root, 99, {}, {"x": b""}, {}, keep=3)
    assert sorted(p.name for p in root.iterdir()) == before


@pytest.mark.parametrize("theta", [1e308, 1e-300])
def test_a_rope_theta_whose_frequencies_vanish_in_float32_is_refused(theta):
    with pytest.raises(ConfigError, match="rope_theta .* vanish or overflow in float32"):
        parse_config({**ONE_LAYER, "rope_theta": theta})
    parse_config({**ONE_LAYER, "rope_theta": 1e7})


@pytest.mark.parametrize("count", [2**63, 10**9])
def test_a_gguf_array_longer_than_the_file_is_refused_at_once(tmp_path, count):
    """gguf's reader would loop over the claimed length (hours) instead of failing."""
    from fuzz_inputs import build_gguf, gguf_layout

    path = build_gguf(tmp_path / "m.gguf")
    at = gguf_layout(path)["kvs"]["tokenizer.ggml.token_type"][4][0]  # the array's length
    data = bytearray(path.read_bytes())
    data[at : at + 8] = struct.pack("<Q", count)
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=f"{path}: metadata 'tokenizer.ggml.token_type'.*past"):
        read_gguf(path)


@pytest.mark.parametrize("blocks", [1, 3, 1000, 2**32 - 1])
def test_a_gguf_whose_block_count_is_not_its_layers_is_refused(tmp_path, blocks):
    """Converted as it was, the folder's config would not fit its weights (and a claimed
    1000 layers would take minutes to compile before saying so)."""
    from fuzz_inputs import build_gguf

    path = build_gguf(tmp_path / "m.gguf", meta={"llama.block_count": ("UINT32", blocks)})
    with pytest.raises(GGUFError, match=f"block_count is {blocks}, but the tensors are of"):
        read_gguf_tensors(path)
    assert main(["convert", str(path), "-o", str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()
