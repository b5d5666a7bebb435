"""Reading llama.cpp GGUF files: metadata to a Hugging Face config, tensors dequantised to
float32 under Hugging Face names (with llama.cpp's Q/K row permutation undone), and the
tokenizer rebuilt from the file's vocabulary and merges; also writes an HF-layout folder."""

from __future__ import annotations

import functools
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

from einplan.errors import EinplanError

# tensor types whose dequantisation is tested here
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
ARCHITECTURES = ("llama", "qwen2")
CONTROL_TOKEN = 3

LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Mixtral in llama.cpp's layout (architecture llama with llama.expert_count): the router, and
# each layer's experts stacked into one (experts, out, in) tensor per projection
MOE_ROUTER = "ffn_gate_inp"
EXPERT_STACKS = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFError(EinplanError):
    """A GGUF file is unreadable, of an unsupported architecture or tensor type."""


@dataclass
class GGUFModel:
    """What einplan takes from a GGUF file besides its tensors (see :func:`read_gguf_tensors`)."""

    config: dict[str, Any]
    tokenizer: Tokenizer
    tokenizer_config: dict[str, Any]


def hf_tensor_name(name: str) -> str:
    """Map a GGUF tensor name (``blk.3.attn_q.weight``) to its Hugging Face name."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[2] == MOE_ROUTER:
        return f"model.layers.{parts[1]}.block_sparse_moe.gate.{parts[3]}"
    raise GGUFError(f"GGUF tensor {name!r} has no Hugging Face counterpart einplan knows")


def expert_tensors(name: str, w: np.ndarray) -> dict[str, np.ndarray] | None:
    """A stacked expert tensor (``blk.3.ffn_gate_exps.weight``, (experts, out, in)) split into
    Mixtral's per-expert Hugging Face tensors; None for any other tensor."""
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in EXPERT_STACKS:
        return None
    if w.ndim != 3:
        raise GGUFError(f"GGUF tensor {name} must be 3-D (experts, out, in), got {list(w.shape)}")
    pre = f"model.layers.{parts[1]}.block_sparse_moe.experts"
    return {f"{pre}.{e}.{EXPERT_STACKS[parts[2]]}.{parts[3]}": w[e] for e in range(len(w))}


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a Q or K projection (interleaved rope pairs back
    to Hugging Face's half-split layout); works for weights and biases. llama.cpp's converter
    maps each head's rows (2, half) -> (half, 2); this maps them back."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def count_field(reader, key: str, default: int | None = None) -> int:
    """A positive integer metadata field (sizes and counts), or a GGUFError naming it."""
    value = _field(reader, key, default)
    if value is None:
        raise GGUFError(f"GGUF metadata {key!r} is missing")
    if not isinstance(value, int | np.integer) or value <= 0:
        raise GGUFError(f"GGUF metadata {key!r} must be a positive integer, got {value!r}")
    return int(value)


def float_field(reader, key: str) -> float:
    """A required number metadata field, or a GGUFError naming it (llama.cpp requires it too:
    a default would silently change every logit)."""
    value = _field(reader, key)
    if not isinstance(value, int | float | np.integer | np.floating):
        raise GGUFError(f"GGUF metadata {key!r} is missing or not a number ({value!r})")
    return float(value)


def gguf_config(reader) -> dict[str, Any]:
    """A Hugging Face style config.json dict from a GGUF file's metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"GGUF architecture {arch!r} is not supported ({', '.join(ARCHITECTURES)})")
    names = {t.name for t in reader.tensors}
    heads = count_field(reader, f"{arch}.attention.head_count")
    hidden = count_field(reader, f"{arch}.embedding_length")
    eps_key = f"{arch}.attention.layer_norm_rms_epsilon"
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens") or ()),
        "hidden_size": hidden,
        "intermediate_size": count_field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": count_field(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": count_field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": count_field(reader, f"{arch}.rope.dimension_count", hidden // heads),
        "max_position_embeddings": count_field(reader, f"{arch}.context_length", 2048),
        # stored as float32 (9.99999975e-06): back to the decimal the model was made with
        "rms_norm_eps": float(f"{float_field(reader, eps_key):.6g}"),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    experts = int(_field(reader, f"{arch}.expert_count", 0) or 0)
    if experts:  # Mixtral: llama.cpp keeps the llama architecture and adds experts
        if arch != "llama":
            raise GGUFError(f"GGUF architecture {arch!r} with experts is not supported (Mixtral)")
        cfg.update(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            num_local_experts=experts,
            num_experts_per_tok=int(_field(reader, f"{arch}.expert_used_count", 2)),
        )
    for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            cfg[hf] = int(value)
    if "eos_token_id" not in cfg:
        cfg["eos_token_id"] = None
    return cfg


def gguf_tokenizer(reader) -> tuple[Tokenizer, dict[str, Any]]:
    """The byte-level BPE tokenizer stored in a GGUF file, and a tokenizer_config dict."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"GGUF tokenizer model {kind!r} is not supported (gpt2 byte-level BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens") or ())
    if not tokens:
        raise GGUFError("GGUF metadata 'tokenizer.ggml.tokens' is missing or empty")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    if len(types) != len(tokens):
        raise GGUFError(
            f"GGUF metadata 'tokenizer.ggml.token_type' has {len(types)} entries for "
            f"{len(tokens)} tokens"
        )
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _field(reader, "tokenizer.ggml.pre") in ("smollm", "qwen2"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True)
            for t, k in zip(tokens, types, strict=True)
            if k == CONTROL_TOKEN
        ]
    )

    def token(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}")
        if i is not None and not 0 <= int(i) < len(tokens):
            raise GGUFError(
                f"GGUF metadata 'tokenizer.ggml.{key}' is {int(i)}, outside the vocabulary "
                f"of {len(tokens)} tokens"
            )
        return None if i is None else tokens[int(i)]

    tk_cfg = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    }
    return tok, {k: v for k, v in tk_cfg.items() if v is not None}


def dequantize_tensor(t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (row-major, HF shape), or a clear error."""
    from gguf.quants import dequantize

    kind = t.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise GGUFError(
            f"GGUF tensor {t.name} has type {kind}, which einplan does not import "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )
    return np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)


# bytes of each GGUF metadata scalar type (uint8, int8, uint16, int16, uint32, int32, float32,
# bool, uint64, int64, float64), and the string and array types
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def check_metadata_lengths(path: Path) -> None:
    """Walk a GGUF file's metadata checking every string and array length against the bytes
    left in the file. (gguf's reader loops over an array's claimed length even past the end
    of the file, so a damaged length of 2^63 would never finish.) Files this does not
    understand (no GGUF magic, another version, an unknown type) are left to the reader."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF" or struct.unpack_from("<I", buf, 4)[0] not in (2, 3):
                return
            (kv_count,) = struct.unpack_from("<Q", buf, 16)
            off, key = 24, "the metadata"

            def need(n: int, what: str) -> None:
                if n > size - off:
                    raise GGUFError(
                        f"{path}: {key}: {what} of {n} bytes runs past the end of the file "
                        f"({size} bytes); the file is truncated or damaged"
                    )

            def length() -> int:
                nonlocal off
                need(8, "a length")
                (n,) = struct.unpack_from("<Q", buf, off)
                off += 8
                return n

            def skip(kind: int) -> bool:
                nonlocal off
                if kind in SCALAR_BYTES:
                    need(SCALAR_BYTES[kind], "a value")
                    off += SCALAR_BYTES[kind]
                elif kind == STRING:
                    n = length()
                    need(n, "a string")
                    off += n
                elif kind == ARRAY:
                    need(4, "an array type")
                    (item,) = struct.unpack_from("<I", buf, off)
                    off += 4
                    count = length()
                    if item in SCALAR_BYTES:
                        need(count * SCALAR_BYTES[item], f"an array of {count} values")
                        off += count * SCALAR_BYTES[item]
                        return True
                    need(count * 8, f"an array of {count} items")  # each at least 8 bytes
                    return all(skip(item) for _ in range(count))
                else:
                    return False  # an unknown type: the reader names it
                return True

            for _ in range(kv_count):
                n = length()
                need(n, "a key")
                key = f"metadata {bytes(buf[off : off + n]).decode('utf-8', 'replace')!r:.80}"
                off += n
                need(4, "a value type")
                (kind,) = struct.unpack_from("<I", buf, off)
                off += 4
                if not skip(kind):
                    return


def open_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` over the file (memory-mapped), or a clear error."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file {str(path)!r} not found")
    try:
        check_metadata_lengths(path)
    except OSError as e:
        raise GGUFError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        return GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise GGUFError(
            f"{path}: not a readable GGUF file, or truncated or damaged ({e}); download or "
            "convert it again"
        ) from None


@functools.lru_cache(maxsize=4)
def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """A GGUF file's config and tokenizer (cached: run asks for them several times)."""
    reader = open_gguf(path)
    try:
        config = gguf_config(reader)
        tokenizer, tk_cfg = gguf_tokenizer(reader)
        return GGUFModel(config, tokenizer, tk_cfg)
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None


def check_rows(name: str, w: np.ndarray, rows: int) -> np.ndarray:
    """``w`` if it has the rows its heads need (a projection of another shape cannot be
    unpermuted), else a GGUFError naming the tensor."""
    if w.shape[0] != rows:
        raise GGUFError(
            f"GGUF tensor {name!r} has shape {list(w.shape)}; the metadata's heads need {rows} rows"
        )
    return w


def read_gguf_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A GGUF file's tensors as float32 under HF names, (out, in), Q/K rows in HF's order.
    Not cached: once bound to a plan, these copies should be freed."""
    reader = open_gguf(path)
    config = read_gguf(path).config
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["head_dim"]
    # llama.cpp permutes Q/K rows for llama (and Mixtral, which it stores as llama) only
    permuted = config["model_type"] in ("llama", "mixtral")
    tensors = {}
    for t in tqdm(reader.tensors, desc="read GGUF", unit="tensor", delay=2, leave=False):
        w = dequantize_tensor(t)
        split = expert_tensors(t.name, w)
        if split is not None:
            tensors.update(split)
            continue
        name = hf_tensor_name(t.name)
        if permuted and ".q_proj." in name:
            w = unpermute_qk(check_rows(t.name, w, heads * head_dim), heads)
        elif permuted and ".k_proj." in name:
            w = unpermute_qk(check_rows(t.name, w, kv_heads * head_dim), kv_heads)
        tensors[name] = w
    layers = sorted({int(m.group(1)) for k in tensors if (m := LAYER_KEY.match(k))})
    n = config["num_hidden_layers"]
    if len(layers) != n or (layers and layers[-1] != n - 1):  # not 0..n-1 (n may be 2^32)
        held = f"layers {layers[0]}..{layers[-1]} ({len(layers)} in all)" if layers else "none"
        raise GGUFError(
            f"{path}: the metadata's block_count is {n}, but the "
            f"tensors are of {held}; the file is damaged or incomplete"
        )
    return tensors
