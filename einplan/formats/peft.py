"""LoRA adapters at run time: initialisation, the PEFT folder layout, and merging into W.

An adapter folder is what PEFT writes and reads: ``adapter_config.json`` (peft_type LORA, r,
lora_alpha, target_modules, ...) and ``adapter_model.safetensors`` with tensors named
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` (r, in) and ``...lora_B.weight``
(out, r). A plan's LoRA params use the same names without the ``base_model.model.`` prefix.
The safetensors metadata also holds a fingerprint of the base weights (their norm weights),
so that an adapter is not silently applied to another model of the same shape.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from einplan.compiler.ir import Graph
from einplan.compiler.lora_spec import MODULES, ROLE_OF_NAME, LoraConfig, LoraError
from einplan.formats.files import write_atomic
from einplan.formats.weights import (
    read_safetensors_index,
    safetensors_metadata,
    save_safetensors,
)

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter_model.safetensors"
BASE_STAMP = "einplan_base"  # safetensors metadata key of the base fingerprint


def lora_params(graph: Graph) -> dict[str, tuple[int, ...]]:
    """The LoRA params of a graph: key -> shape."""
    return {n.attrs["key"]: tuple(n.shape) for n in graph.params() if "lora" in n.attrs}


def init_lora(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """A fresh adapter: A uniform in +-1/sqrt(in) (PEFT's kaiming-uniform with a = sqrt(5)),
    each from its own (seed, key) stream; B zero, so the adapter changes nothing yet."""
    out = {}
    for n in graph.params():
        meta = n.attrs.get("lora")
        if meta is None:
            continue
        key = n.attrs["key"]
        if meta.part == "B":
            out[key] = np.zeros(n.shape, np.float32)
        else:
            bound = 1.0 / np.sqrt(meta.fan_in)
            rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
            out[key] = rng.uniform(-bound, bound, n.shape).astype(np.float32)
    return out


def base_fingerprint(tensors: Mapping[str, np.ndarray]) -> str:
    """A short hash of a checkpoint's norm weights (float in every format einplan writes)."""
    h = hashlib.sha256()
    for key in sorted(k for k in tensors if k.endswith("norm.weight")):
        h.update(key.encode())
        h.update(np.ascontiguousarray(tensors[key], np.float32).tobytes())
    return h.hexdigest()[:16]


def save_adapter(
    out_dir: str | os.PathLike,
    arrays: Mapping[str, np.ndarray],
    cfg: LoraConfig,
    base: Mapping[str, np.ndarray],
    base_name: str = "",
) -> Path:
    """Write ``arrays`` (plan LoRA keys) as a PEFT adapter folder for base weights ``base``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = peft_config(cfg, base_name)
    write_atomic(out / CONFIG_FILE, json.dumps(config, indent=2))
    tensors = {PEFT_PREFIX + k: v for k, v in arrays.items()}
    save_safetensors(tensors, out / TENSORS_FILE, {BASE_STAMP: base_fingerprint(base)})
    return out


def peft_config(cfg: LoraConfig, base_name: str = "") -> dict[str, Any]:
    """The adapter_config.json of an adapter with these options, as PEFT writes it."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(MODULES[role] for role in cfg.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "revision": None,
    }


# adapter_config.json keys of features beyond plain LoRA, with the value meaning "not used"
PLAIN_LORA: dict[str, Any] = {
    "use_dora": False,
    "use_rslora": False,
    "bias": "none",
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
}


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The adapter_config.json of a PEFT LoRA folder, checked to be LoRA."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise LoraError(f"{folder}: no {CONFIG_FILE} (not a PEFT adapter folder)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoraError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else config
        raise LoraError(f"{path}: peft_type {kind!r}, only LORA is supported")
    used = [k for k, plain in PLAIN_LORA.items() if config.get(k, plain) not in (plain, None)]
    if used:
        raise LoraError(
            f"{path}: adapter features einplan does not support: "
            + ", ".join(f"{k}={config[k]!r}" for k in used)
        )
    return config


def adapter_options(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``--lora`` options that make a plan fit a PEFT adapter folder."""
    config = read_adapter_config(folder)
    modules = config.get("target_modules") or []
    if isinstance(modules, str):
        raise LoraError(f"{folder}: target_modules as a regular expression is not supported")
    return {
        "r": config.get("r", 8),
        "alpha": config.get("lora_alpha", 8),
        "targets": list(modules),
        "dropout": config.get("lora_dropout", 0.0),
    }


def load_adapter(
    folder: str | os.PathLike, graph: Graph, base: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """The LoRA params of ``graph`` from a PEFT adapter folder, after checking that its rank,
    alpha and targets are the plan's, its tensors fit the plan's shapes, and (when ``base``
    tensors are given) that it was made for these base weights."""
    config = read_adapter_config(folder)
    want = lora_params(graph)
    if not want:
        raise LoraError("this plan has no LoRA params; compile it with --lora (or --lora ADAPTER)")
    metas = [n.attrs["lora"] for n in graph.params() if "lora" in n.attrs]
    meta, roles = metas[0], {m.role for m in metas}
    theirs = {ROLE_OF_NAME.get(m, m) for m in config.get("target_modules") or []}
    differs = []
    if config.get("r") != meta.r:
        differs.append(f"r {config.get('r')} vs {meta.r}")
    if float(config.get("lora_alpha", -1)) != float(meta.alpha):
        differs.append(f"alpha {config.get('lora_alpha')} vs {meta.alpha}")
    if theirs != roles:
        differs.append(f"targets {sorted(theirs)} vs {sorted(roles)}")
    if differs:
        raise LoraError(
            f"adapter {folder} does not match the plan's LoRA ({'; '.join(differs)}); "
            f"compile the plan with --lora {folder}"
        )
    path = Path(folder) / TENSORS_FILE
    if not path.is_file():
        raise LoraError(f"{folder}: no {TENSORS_FILE}")
    tensors = {k.removeprefix(PEFT_PREFIX): a for k, (a, _) in read_safetensors_index(path).items()}
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise LoraError(
            f"{path}: tensors that match none of the plan's LoRA targets: {', '.join(extra[:4])}"
            f"{' ...' if len(extra) > 4 else ''}"
        )
    missing = sorted(set(want) - set(tensors))
    bad = [
        f"{k}: adapter {list(tensors[k].shape)}, model {list(s)}"
        for k, s in want.items()
        if k in tensors and tuple(tensors[k].shape) != s
    ]
    if missing or bad:
        raise LoraError(
            f"adapter {folder} was made for another base model: "
            + "; ".join(([f"missing {', '.join(missing[:4])}"] if missing else []) + bad[:4])
        )
    stamp = safetensors_metadata(path).get(BASE_STAMP)
    if base is not None and stamp and stamp != base_fingerprint(base):
        raise LoraError(
            f"adapter {folder} was made for other base weights "
            f"({config.get('base_model_name_or_path') or 'unnamed'}): their norm weights differ"
        )
    return {k: np.asarray(tensors[k], np.float32) for k in want}


def merge_lora(
    tensors: Mapping[str, np.ndarray], adapter: Mapping[str, np.ndarray], scale: float
) -> dict[str, np.ndarray]:
    """Base tensors with every adapted weight replaced by ``W + scale * B @ A`` (float32).
    The tied output head (``lm_head`` LoRA on a model without lm_head.weight) becomes its own
    ``lm_head.weight``: merging into the shared embedding would change the lookup too."""
    out = dict(tensors)
    for key in adapter:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        a, b = adapter[key], adapter[f"{module}.lora_B.weight"]
        weight = f"{module}.weight"
        if weight not in tensors and module == "lm_head":
            weight_src = tensors["model.embed_tokens.weight"]
        else:
            weight_src = tensors[weight]
        out[weight] = (np.asarray(weight_src, np.float32) + np.float32(scale) * (b @ a)).astype(
            np.float32
        )
    return out
