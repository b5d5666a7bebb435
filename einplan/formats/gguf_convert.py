"""GGUF -> Hugging Face folder: what ``einplan convert`` writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from einplan.compiler.dtypes import to_numpy_dtype
from einplan.formats.files import write_atomic
from einplan.formats.gguf import read_gguf, read_gguf_tensors
from einplan.formats.weights import save_safetensors


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write an HF-layout folder (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, generation_config.json) from a GGUF file."""
    model = read_gguf(path)
    out = Path(out_dir)
    np_dtype = to_numpy_dtype(dtype)
    tensors = {k: v.astype(np_dtype) for k, v in read_gguf_tensors(path).items()}
    out.mkdir(parents=True, exist_ok=True)
    config = {
        **model.config,
        "torch_dtype": {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[dtype],
    }
    save_safetensors(tensors, out / "model.safetensors")
    write_atomic(out / "config.json", json.dumps(config, indent=2))
    write_atomic(out / "tokenizer.json", lambda tmp: model.tokenizer.save(tmp))
    write_atomic(out / "tokenizer_config.json", json.dumps(model.tokenizer_config, indent=2))
    special = {k: config.get(k) for k in ("bos_token_id", "eos_token_id")}
    generation = {k: v for k, v in special.items() if v is not None}  # as transformers writes
    write_atomic(out / "generation_config.json", json.dumps(generation, indent=2))
    return out
