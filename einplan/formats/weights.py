"""Weights for a plan: Hugging Face folders (single or sharded safetensors), hub ids, and
seeded random initialisation when asked for explicitly.

safetensors files are checked by the ``safetensors`` package's own reader (header, dtypes,
shapes against offsets, offsets against the file), then memory-mapped, and only the tensors a
plan names are touched, so a float32 checkpoint costs no copy and no resident memory until the
runtime reads it. (Its NumPy loader copies every tensor and has no bfloat16, hence the
memory map over the offsets of the checked header.)
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import zlib
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from einplan.compiler.attrs import INPUT_ABSMAX, PackMember, QuantPart
from einplan.compiler.dtypes import to_numpy_dtype
from einplan.compiler.ir import Graph, Node
from einplan.errors import EinplanError
from einplan.formats.files import write_atomic
from einplan.runtime.quantize import quantize_weight

SAFETENSORS_DTYPES = {
    "F64": "f64",
    "F32": "f32",
    "BF16": "bf16",
    "F16": "f16",
    "I64": "i64",
    "I32": "i32",
    "I8": "i8",
    "U8": "u8",
}


class WeightsError(EinplanError):
    """Weights cannot be found, read, or do not match the plan."""


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a .safetensors file and its length, once the ``safetensors`` package
    has found the file well-formed; a malformed one is a :class:`WeightsError` naming it."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise WeightsError(f"{path}: not a file (give a .safetensors file or its model folder)")
    try:
        with safe_open(str(path), "numpy"):
            pass
    except (SafetensorError, OSError) as e:
        raise WeightsError(
            f"{path}: not a valid safetensors file, or truncated or damaged ({e}); "
            "download or export it again"
        ) from None
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), n


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The free-form ``__metadata__`` strings of a .safetensors file."""
    return read_safetensors_header(path)[0].get("__metadata__", {})


def read_safetensors_index(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    """Map every tensor name of one .safetensors file to (memory-mapped array, dtype name)."""
    header, n = read_safetensors_header(path)
    data = np.memmap(path, np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise WeightsError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        begin, end = (8 + n + o for o in info["data_offsets"])
        shape = tuple(info["shape"])
        np_dtype = to_numpy_dtype(dtype)
        out[name] = (data[begin:end].view(np_dtype).reshape(shape), dtype)
    return out


def resolve_weights_dir(source: str | os.PathLike) -> Path:
    """Return a local folder for a path or a Hugging Face hub id (downloaded or cached)."""
    path = Path(source)
    if path.exists():
        return path
    text = str(source)
    if text.count("/") != 1 or text.startswith((".", "/")) or text.endswith(".gguf"):
        raise WeightsError(
            f"weights {text!r} not found (give an HF-layout folder, a "
            "*.safetensors file, or a hub id like HuggingFaceTB/SmolLM2-135M)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
        )
    except LocalEntryNotFoundError:
        raise WeightsError(
            f"hub model {text!r} is not in the local cache and the hub cannot be "
            "reached (HF_HUB_OFFLINE or no network); download it first or give "
            "a local folder"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise WeightsError(f"hub model {text!r} could not be fetched: {e}") from None


def open_checkpoint(source: str | os.PathLike) -> dict[str, tuple[np.ndarray, str]]:
    """All tensors of a checkpoint (file, folder, sharded folder or hub id), memory-mapped."""
    path = resolve_weights_dir(source)
    if path.suffix == ".gguf":
        from einplan.formats.gguf import read_gguf_tensors

        return {k: (v, "f32") for k, v in read_gguf_tensors(path).items()}
    if path.is_file():
        return read_safetensors_index(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{index}: damaged shard index ({e})") from None
        files = [path / s for s in shards]
    elif (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise WeightsError(
                f"{path}: expected model.safetensors, a sharded index "
                "(model.safetensors.index.json) or exactly one *.safetensors file; "
                f"found {len(files)}"
            )
    tensors: dict[str, tuple[np.ndarray, str]] = {}
    for f in files:
        if not f.exists():
            raise WeightsError(f"{f}: shard named in the index is missing")
        tensors.update(read_safetensors_index(f))
    return tensors


def weights_config(source: str | os.PathLike) -> dict | None:
    """The model config that came with the weights (config.json or GGUF metadata), if any."""
    path = resolve_weights_dir(source)
    if path.suffix == ".gguf":
        from einplan.formats.gguf import read_gguf

        return read_gguf(path).config
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{cfg}: not valid JSON ({e})") from None


# Tensors a checkpoint may carry that no plan reads.
# (calibrated activation ranges serve plans with static scales and are no harm to others)
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", ".input_absmax")


def quant_members(n: Node) -> list[PackMember]:
    """The key, rows and float weight key of each weight a quantised param is made of: one, or
    several concatenated along the rows (compiler/passes/pack.py)."""
    if "pack" in n.attrs:
        return list(n.attrs["pack"])
    return [PackMember(n.attrs["key"], n.shape[0], n.attrs["quant"].of)]


def checkpoint_shapes(graph: Graph, stored: Collection[str] = ()) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors a graph's params are made of, with their shapes; a packed param
    (``attrs["pack"]``, see compiler/passes/pack.py) is made of several (out, in) tensors. A
    quantised weight (compiler/passes/quantize.py) is made of its float (out, in) tensor, or,
    when its key is in ``stored`` (a checkpoint written by ``einplan quantize``), of the packed
    tensors as the plan holds them. LoRA params come from adapters, not checkpoints."""
    out = {}
    for n in graph.params():
        quant = n.attrs.get("quant")
        if "lora" in n.attrs:
            continue
        if quant and quant.part != INPUT_ABSMAX:
            for m in quant_members(n):
                if m.of in stored:
                    out[m.key] = (m.rows, n.shape[1])
                elif quant.part == "q":
                    out[m.of] = (m.rows, quant.shape[1])
        elif "pack" in n.attrs:
            for m in n.attrs["pack"]:
                out[m.key] = (m.rows, n.shape[0])
        else:
            out[n.attrs["key"]] = tuple(n.shape)
    return out


def float_tensors(graph: Graph, stored: Collection[str] = ()) -> dict[str, str]:
    """The checkpoint tensors bound to float params (converted to the param's dtype, or
    quantised from float), with that dtype: an integer tensor there is damage, never a
    weight (only the stored parts of quantised weights, ``stored``, are integers)."""
    out = {}
    for n in graph.params():
        quant = n.attrs.get("quant")
        if "lora" in n.attrs:
            continue
        if quant and quant.part != INPUT_ABSMAX:
            if quant.part == "q":
                out.update({m.of: "f32" for m in quant_members(n) if m.of not in stored})
        elif "pack" in n.attrs:
            out.update({m.key: n.dtype for m in n.attrs["pack"]})
        else:
            out[n.attrs["key"]] = n.dtype
    return out


def stored_quantized(graph: Graph, tensors: Mapping[str, np.ndarray]) -> set[str]:
    """The quantised weights a checkpoint already holds as integers (``einplan quantize``)."""
    return {
        m.of
        for n in graph.params()
        if (q := n.attrs.get("quant")) and q.part == "q"
        for m in quant_members(n)
        if m.key in tensors and tensors[m.key].dtype.kind in "iu"
    }


def bind_params(graph: Graph, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays for a graph's params from checkpoint tensors: packed params concatenated (and
    float ones transposed), float weights of quantised params quantised (integers taken as
    they are), dtypes converted where they differ, the rest passed through (zero copy)."""
    out = {}
    quantized: dict[str, dict[str, np.ndarray]] = {}  # float key -> its packed parts
    # shown only past 2 s: quantising a checkpoint as it loads takes that long
    for n in tqdm(graph.params(), desc="bind weights", unit="param", delay=2, leave=False):
        dtype = to_numpy_dtype(n.dtype)
        quant = n.attrs.get("quant")
        if "lora" in n.attrs:
            continue
        if quant and quant.part != INPUT_ABSMAX:
            parts = []
            for m in quant_members(n):
                if tensors[m.of].dtype.kind != "f":
                    parts.append(tensors[m.key])
                    continue
                if m.of not in quantized:
                    w = tensors[m.of]
                    quantized[m.of] = quantize_weight(w, quant.bits, quant.group, quant.symmetric)
                parts.append(quantized[m.of][quant.part])
            out[n.attrs["key"]] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        elif "pack" in n.attrs:
            parts = [tensors[m.key].T for m in n.attrs["pack"]]
            # row-major (in, out): concatenate keeps one transposed part column-major
            packed = np.ascontiguousarray(np.concatenate(parts, axis=1))
            out[n.attrs["key"]] = packed.astype(dtype, copy=False)
            for m in n.attrs["pack"]:  # copied: the file's pages of it are not needed now
                drop_file_pages(tensors[m.key])
        else:
            arr = tensors[n.attrs["key"]]
            out[n.attrs["key"]] = arr if arr.dtype == dtype else arr.astype(dtype)
    return out


def load_weights(
    graph: Graph, source: str | os.PathLike | dict[str, np.ndarray], tied: bool = False
) -> dict[str, np.ndarray]:
    """Bind a checkpoint (a path, a hub id, or a dict of tensors under HF names) to a graph's
    params. Missing, unexpected or mis-shaped tensors raise :class:`WeightsError` listing all.
    """
    if isinstance(source, dict):
        tensors, origin = source, "given as arrays"
    else:
        tensors = {k: a for k, (a, _) in open_checkpoint(source).items()}
        origin = str(source)
    stored = stored_quantized(graph, tensors)
    want = checkpoint_shapes(graph, stored)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(
        k
        for k in set(tensors) - set(want)
        if not k.endswith(IGNORABLE_SUFFIXES) and not (tied and k == "lm_head.weight")
    )
    bad_keys = [k for k in sorted(set(want) & set(tensors)) if tuple(tensors[k].shape) != want[k]]
    bad = [f"{k}: checkpoint {list(tensors[k].shape)}, plan {list(want[k])}" for k in bad_keys]
    floats = float_tensors(graph, stored)
    bad_dtypes = [
        f"{k}: checkpoint {tensors[k].dtype}, plan {floats[k]}"
        for k in sorted(set(floats) & set(tensors))
        if tensors[k].dtype.kind in "biu"
    ]
    problems = quantization_hints(graph, [*missing, *extra, *bad_keys])
    if missing:
        problems.append(f"missing tensors: {shorten(missing, ', ')}")
    if extra:
        problems.append(f"unexpected tensors: {shorten(extra, ', ')}")
    if bad:
        problems.append(f"shape mismatches: {shorten(bad, '; ')}")
    if bad_dtypes:
        problems.append(
            f"integer tensors for float weights (damaged or mislabelled dtype): "
            f"{shorten(bad_dtypes, '; ')}"
        )
    if problems:
        raise WeightsError(f"weights {origin} do not fit this plan: " + " | ".join(problems))
    bound = bind_params(graph, {k: tensors[k] for k in want})
    bad = non_finite(bound)
    if bad:
        raise WeightsError(
            f"weights {origin} hold NaN or infinite values in {shorten(bad, ', ')}; the file "
            "is damaged or comes from a diverged training run (use an earlier checkpoint)"
        )
    release_file_pages(tensors.values())
    return bound


def drop_file_pages(a: np.ndarray) -> None:
    """Unmap from this process the pages of one memory-mapped tensor (the OS keeps them in its
    page cache; a later read faults them back in); nothing for an array in memory. Binding
    copies most weights (transposed, packed): without this each copied weight stayed resident
    twice, as its copy and as file pages (an fp32 SmolLM2 held 1.16 GB of RSS for 0.51 GB of
    weights). Called as each packed weight is copied (so the peak holds one copy) and on
    every tensor once binding is done (release_file_pages)."""
    m = getattr(a, "_mmap", None)
    if m is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    start = a.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    lo = start // mmap.PAGESIZE * mmap.PAGESIZE
    hi = min(len(m), -(-(start + a.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
    if hi > lo:
        m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def release_file_pages(arrays: Iterable[np.ndarray]) -> None:
    """drop_file_pages of every tensor binding read (the NaN check read them all)."""
    for a in arrays:
        drop_file_pages(a)


def non_finite(arrays: Mapping[str, np.ndarray], chunk: int = 1 << 22) -> list[str]:
    """The names of the float arrays holding NaN or infinity, checked ``chunk`` values at a
    time (no array-sized temporary; about 0.04 s for a 538 MB float32 model)."""
    bad = []
    for key, a in arrays.items():
        if a.dtype.kind in "biu":
            continue
        flat = a.reshape(-1)
        if not all(np.isfinite(flat[i : i + chunk]).all() for i in range(0, flat.size, chunk)):
            bad.append(key)
    return bad


def shorten(items: list[str], sep: str, most: int = 8) -> str:
    """Join at most ``most`` items, saying how many more there are."""
    more = f"{sep}... ({len(items) - most} more)" if len(items) > most else ""
    return sep.join(items[:most]) + more


def quantization_hints(graph: Graph, wrong: list[str]) -> list[str]:
    """What to do when the missing, unexpected or mis-shaped tensors ``wrong`` say the weights
    were quantised with another scheme than the plan's (or not at all, or not calibrated)."""
    hints = []
    weights = [q for n in graph.params() if (q := n.attrs.get("quant")) and q.part == "q"]
    if any(k.endswith(".input_absmax") for k in wrong):
        hints.append(
            "the plan quantises activations with static scales: make the weights with "
            "einplan quantize --calibrate TEXT"
        )
    packed = {q.of for q in weights}
    if any(k.endswith(("weight_scale", "weight_zero_point")) or k in packed for k in wrong):
        schemes = sorted({describe_quant(q) for q in weights}) or ["float"]
        hints.append(
            "the weights were quantised with another scheme than the plan's "
            f"(plan: {', '.join(schemes)} weights); quantise them again or compile the plan "
            "with their --quant"
        )
    return hints


def describe_quant(quant: QuantPart) -> str:
    """A quantised param's scheme: ``int4 g64 symmetric``, ``int8 per channel asymmetric``."""
    layout = "per channel" if quant.bits == 8 else f"g{quant.group}"
    return f"int{quant.bits} {layout} {'symmetric' if quant.symmetric else 'asymmetric'}"


def save_safetensors(
    tensors: Mapping[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write tensors as one .safetensors file, atomically (``format: pt`` so that PyTorch
    loaders accept it)."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    write_atomic(
        path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
    )


MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def copy_model_files(src: Path, out: Path) -> None:
    """Copy a model folder's config and tokenizer files (everything but the weights) to ``out``,
    so that a folder of quantised or merged weights is a complete model folder."""
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (src / name).is_file():
            write_atomic(out / name, lambda tmp, name=name: shutil.copyfile(src / name, tmp))


class RandomTensors(Mapping):
    """Seeded random checkpoint tensors made on demand, each from its own key's stream, so the
    values depend only on (seed, key) and packing never holds two copies of the weights."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int, std: float) -> None:
        self.shapes, self.seed, self.std = shapes, seed, np.float32(std)

    def __getitem__(self, key: str) -> np.ndarray:
        shape = self.shapes[key]
        if key.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        if key.endswith(".bias"):
            return np.zeros(shape, np.float32)
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])
        return rng.standard_normal(shape, np.float32) * self.std

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def random_weights(graph: Graph, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """Seeded random weights for every param (norm weights 1, biases 0): for demos and
    benchmarks, only when asked for; never a fallback for a failed load."""
    return bind_params(graph, RandomTensors(checkpoint_shapes(graph), seed, std))
