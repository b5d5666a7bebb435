"""Writes small GGUF files from the transformers fixtures, the way llama.cpp's converter
lays them out (names, Q/K row permutation, byte-level vocabulary), for the import tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from safetensors.numpy import load_file

from einplan.formats.gguf import EXPERT_STACKS, LAYER_NAMES, MOE_ROUTER, TOP_NAMES
from einplan.formats.tokenizer import byte_to_unicode

GGUF_NAMES = {hf: g for g, hf in TOP_NAMES.items()}


def gguf_name(hf: str) -> str:
    """The llama.cpp name of a Hugging Face tensor name."""
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    parts = hf.split(".")  # model.layers.N.<module path>.<weight|bias>
    module = ".".join(parts[3:-1])
    if module == "block_sparse_moe.gate":
        return f"blk.{parts[2]}.{MOE_ROUTER}.{parts[-1]}"
    short = next(k for k, v in LAYER_NAMES.items() if v == module)
    return f"blk.{parts[2]}.{short}.{parts[-1]}"


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation of Q/K rows (convert_hf_to_gguf.py's ``permute``: each head's
    rows (2, half) -> (half, 2)), the inverse of the importer's."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stack_experts(tensors: dict, layers: int, experts: int) -> dict:
    """Mixtral's per-expert tensors stacked into llama.cpp's ``blk.N.ffn_*_exps.weight``
    (experts, out, in), the other tensors as they are."""
    out = dict(tensors)
    for i in range(layers):
        for gname, short in EXPERT_STACKS.items():
            keys = [
                f"model.layers.{i}.block_sparse_moe.experts.{e}.{short}.weight"
                for e in range(experts)
            ]
            out[f"blk.{i}.{gname}.weight"] = np.stack([out.pop(k) for k in keys])
    return out


def write_gguf(
    folder: Path, out: Path, qtype: str = "F32", tensor_types: dict | None = None
) -> Path:
    """A GGUF file of a fixture folder; matrices stored as ``qtype`` unless overridden."""
    cfg = json.loads((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = GGUFWriter(str(out), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(list(byte_to_unicode().values()))
    w.add_token_merges([])
    w.add_token_types([1] * 256)
    w.add_eos_token_id(2)
    if cfg.get("num_local_experts"):  # Mixtral: llama.cpp's layout, experts stacked per layer
        w.add_expert_count(cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        tensors = stack_experts(tensors, cfg["num_hidden_layers"], cfg["num_local_experts"])
    for name, arr in tensors.items():
        if ".q_proj." in name:
            arr = permute_qk(arr, heads)
        elif ".k_proj." in name:
            arr = permute_qk(arr, kv)
        kind = (tensor_types or {}).get(name, qtype if arr.ndim >= 2 else "F32")
        t = GGMLQuantizationType[kind]
        gname = name if name.startswith("blk.") else gguf_name(name)
        if kind == "F32":
            w.add_tensor(gname, arr)
        elif kind == "F16":
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            w.add_tensor(gname, quantize(arr, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
