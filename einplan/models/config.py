"""Model configuration: a Hugging Face ``config.json`` (or einplan's own) checked strictly.

Every key is either used, known to be irrelevant to inference, or an error
naming it: a typo such as ``num_hiden_layers`` must not silently fall back to
a default.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from einplan.errors import EinplanError

FLOAT32_TINY = 1.1754943508222875e-38  # np.finfo(np.float32).tiny


class ConfigError(EinplanError):
    """A config is unreadable, has an unknown key, or a value of the wrong type."""


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe")

# Keys of Hugging Face configs that do not change the forward computation.
IGNORED_HF_KEYS = {
    "architectures",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "initializer_range",
    "use_cache",
    "attention_dropout",
    "pretraining_tp",
    "is_llama_config",
    "rope_interleaved",
    "max_window_layers",
    "transformers.js_config",
    "_name_or_path",
    "tokenizer_class",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "unsloth_fixed",
    "layer_types",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_sliding_window",
    "sliding_window",
    "mlp_bias",
    "hidden_act",
    "model_type",
    "attention_bias",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, normalised from any supported config layout."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_theta: float
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    model_type: str = "llama"
    max_batch: int = 64
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    name: str = ""
    # mixture of experts (Mixtral, Qwen2-MoE); num_experts = 0 for a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert (0: none)
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.0
    output_router_logits: bool = False  # the load-balancing loss joins the training loss

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer ``i`` has routed experts (else a dense SwiGLU MLP)."""
        return (
            self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the normalised config as plain data (stored in the plan file)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# einplan's own keys beside the Hugging Face ones ("train" is read by models/train_config.py,
# the pass SECTIONS by compiler/lora_spec.py and compiler/quant_scheme.py).
EINPLAN_KEYS = {
    "max_batch": int,
    "name": str,
    "head_dim": (int, type(None)),  # null in Mixtral configs
    "num_key_value_heads": int,
    "train": dict,
    "lora": (dict, str),
    "quant": (dict, str),
}
SECTIONS = ("lora", "quant")

TYPED_KEYS: dict[str, type | tuple[type, ...]] = {
    "vocab_size": int,
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "rms_norm_eps": (int, float),
    "max_position_embeddings": int,
    "tie_word_embeddings": bool,
    "rope_theta": (int, float),
    "attention_bias": bool,
    "mlp_bias": bool,
    "hidden_act": str,
    "model_type": str,
    "use_sliding_window": bool,
    "bos_token_id": (int, type(None)),
    "eos_token_id": (int, list, type(None)),
    "rope_scaling": (dict, type(None)),
    "rope_parameters": (dict, type(None)),
    "sliding_window": (int, type(None)),
    # mixture of experts: Mixtral names the expert count num_local_experts, Qwen2-MoE num_experts
    "num_local_experts": int,
    "num_experts": int,
    "num_experts_per_tok": int,
    "moe_intermediate_size": int,
    "shared_expert_intermediate_size": int,
    "norm_topk_prob": bool,
    "decoder_sparse_step": int,
    "mlp_only_layers": list,
    "router_aux_loss_coef": (int, float),
    "output_router_logits": bool,
    "router_jitter_noise": (int, float),
    "qkv_bias": bool,
    **EINPLAN_KEYS,
}
# Sizes beyond any real model (Llama-3 405B: 126 layers, hidden 16384, 53248 intermediate,
# 128 heads, 128k vocabulary and context), refused before tracing a graph or sizing a buffer.
SIZE_LIMITS = {
    "num_hidden_layers": 100_000,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 22,
    "num_attention_heads": 1 << 14,
    "num_key_value_heads": 1 << 14,
    "head_dim": 1 << 14,
    "vocab_size": 1 << 24,
    "max_position_embeddings": 1 << 26,
    "max_batch": 1 << 20,
    "num_local_experts": 1 << 12,  # mixture of experts: DeepSeek-V3 has 256
    "num_experts": 1 << 12,
    "num_experts_per_tok": 1 << 12,
    "moe_intermediate_size": 1 << 22,
}

REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def _check_types(raw: dict[str, Any], origin: str) -> None:
    for key, value in raw.items():
        if key not in TYPED_KEYS and key not in IGNORED_HF_KEYS:
            raise ConfigError(
                f"{origin}: unknown config key {key!r}; check its spelling "
                f"(known keys: {', '.join(sorted(TYPED_KEYS))})"
            )
        want = TYPED_KEYS.get(key)
        if want is None:
            continue
        wants = want if isinstance(want, tuple) else (want,)
        ok = isinstance(value, wants) and not (isinstance(value, bool) and bool not in wants)
        if not ok:
            names = " or ".join(t.__name__ for t in wants)
            raise ConfigError(
                f"{origin}: config key {key!r} must be {names}, "
                f"got {type(value).__name__} {value!r}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{origin}: config key {key!r} must be finite, got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{origin}: config key {key!r} must not be negative, got {value}")


def _check_model_type(raw: dict[str, Any], origin: str) -> None:
    model_type = raw.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{origin}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def _check_sizes(raw: dict[str, Any], origin: str) -> None:
    for key, limit in SIZE_LIMITS.items():
        value = raw.get(key)
        if isinstance(value, int) and value < 1:
            raise ConfigError(f"{origin}: {key} must be at least 1, got {value}")
        if isinstance(value, int) and value > limit:
            raise ConfigError(
                f"{origin}: {key} {value:,} is beyond einplan's limit of {limit:,} "
                "(far above any real model's); check the config"
            )


def _rope(raw: dict[str, Any], origin: str) -> tuple[float, dict[str, Any]]:
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    rope_type = merged.pop("rope_type", merged.pop("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ConfigError(
            f"{origin}: rope type {rope_type!r} is not supported "
            "(supported: default, linear, llama3)"
        )
    values = {"rope_theta": theta, **{k: v for k, v in merged.items() if isinstance(v, float)}}
    for key, value in values.items():
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{origin}: {key} must be a positive finite number, got {value}")
    if rope_type == "default":
        return theta, {}
    need = {
        "linear": ("factor",),
        "llama3": (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ),
    }[rope_type]
    missing = [k for k in need if k not in merged]
    if missing:
        raise ConfigError(f"{origin}: rope scaling {rope_type!r} needs {', '.join(missing)}")
    return theta, {"rope_type": rope_type, **{k: float(merged[k]) for k in need}}


def parse_config(raw: dict[str, Any], origin: str = "config") -> ModelConfig:
    """Validate a config dict (HF or einplan layout) and normalise it."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: a config must be a JSON object")
    if isinstance(raw.get("model_type", "llama"), str):  # before the keys: gpt2 has others
        _check_model_type(raw, origin)
    _check_types(raw, origin)
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"{origin}: missing config key(s) {', '.join(missing)}")
    _check_sizes(raw, origin)
    model_type = raw.get("model_type", "llama")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{origin}: hidden_act {raw['hidden_act']!r} is not supported (silu)")
    if raw.get("mlp_bias"):
        raise ConfigError(f"{origin}: mlp_bias=true is not supported")
    if raw.get("use_sliding_window"):
        raise ConfigError(f"{origin}: use_sliding_window=true is not supported")
    heads = raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads") or heads
    if heads == 0 or heads % kv_heads:
        raise ConfigError(
            f"{origin}: num_attention_heads ({heads}) must be a multiple of "
            f"num_key_value_heads ({kv_heads})"
        )
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    if not raw.get("head_dim") and raw["hidden_size"] % heads:
        raise ConfigError(
            f"{origin}: hidden_size {raw['hidden_size']} is not divisible by "
            f"num_attention_heads {heads}; give head_dim"
        )
    if head_dim % 2:
        raise ConfigError(f"{origin}: head_dim {head_dim} must be even for rotary embeddings")
    max_pos = raw.get("max_position_embeddings", 2048)
    window = raw.get("sliding_window")
    if model_type == "mistral" and window:
        max_pos = min(max_pos, window)  # within the window, sliding attention is plain causal
    theta, scaling = _rope(raw, origin)
    # the slowest rotary frequency, theta^-(head_dim-2)/head_dim, must be a normal float32:
    # below, those dims never rotate (1e308 with head_dim 8 gives 1e-231: zero in float32)
    slowest = theta ** (-(head_dim - 2) / head_dim) if head_dim > 2 else 1.0
    if not FLOAT32_TINY <= slowest <= 1 / FLOAT32_TINY:
        raise ConfigError(
            f"{origin}: rope_theta {theta:g} makes the rotary frequencies of head_dim "
            f"{head_dim} vanish or overflow in float32 (models use 1e4 to 1e7)"
        )
    eps = float(raw.get("rms_norm_eps", 1e-6))
    # below float32's smallest normal the eps vanishes; from 1 up it swamps the mean square
    if not FLOAT32_TINY <= eps < 1:
        raise ConfigError(
            f"{origin}: rms_norm_eps must lie in [{FLOAT32_TINY:.3g}, 1) (models use 1e-5 or "
            f"1e-6), got {eps}"
        )
    eos = raw.get("eos_token_id")
    moe = _moe(raw, model_type, origin)
    return ModelConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=eps,
        max_position_embeddings=max_pos,
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        qkv_bias=bool(
            raw.get("qkv_bias", True)
            if model_type == "qwen2_moe"
            else raw.get("attention_bias", model_type == "qwen2")
        ),
        rope_theta=theta,
        rope_scaling=scaling,
        model_type=model_type,
        max_batch=raw.get("max_batch", 64),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        name=raw.get("name", ""),
        **moe,
    )


def _moe(raw: dict[str, Any], model_type: str, origin: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a Mixtral or Qwen2-MoE config (none for dense)."""
    moe_keys = [k for k in raw if k in MOE_KEYS]
    if model_type not in MOE_MODEL_TYPES:
        if moe_keys:
            raise ConfigError(
                f"{origin}: {', '.join(moe_keys)} belong to a mixture-of-experts model; "
                f"model_type {model_type!r} is dense (MoE types: {', '.join(MOE_MODEL_TYPES)})"
            )
        return {}
    count_key = "num_local_experts" if model_type == "mixtral" else "num_experts"
    experts = raw.get(count_key, 8 if model_type == "mixtral" else 60)
    per_tok = raw.get("num_experts_per_tok", 2 if model_type == "mixtral" else 4)
    if experts < 1:
        raise ConfigError(f"{origin}: {count_key} must be at least 1, got {experts}")
    if not 1 <= per_tok <= experts:
        raise ConfigError(
            f"{origin}: num_experts_per_tok ({per_tok}) must lie between 1 and "
            f"{count_key} ({experts})"
        )
    if raw.get("router_jitter_noise"):
        raise ConfigError(f"{origin}: router_jitter_noise > 0 is not supported (set it to 0)")
    layers = raw["num_hidden_layers"]
    only = raw.get("mlp_only_layers") or []
    if not all(isinstance(i, int) and 0 <= i < layers for i in only):
        raise ConfigError(
            f"{origin}: mlp_only_layers must list layer indices in [0, {layers}), got {only}"
        )
    step = raw.get("decoder_sparse_step", 1)
    if step < 1:
        raise ConfigError(f"{origin}: decoder_sparse_step must be at least 1, got {step}")
    qwen = model_type == "qwen2_moe"
    return dict(
        num_experts=experts,
        num_experts_per_tok=per_tok,
        moe_intermediate_size=raw.get("moe_intermediate_size", 1408)
        if qwen
        else raw["intermediate_size"],
        norm_topk_prob=raw.get("norm_topk_prob", False) if qwen else True,
        shared_expert_intermediate_size=raw.get("shared_expert_intermediate_size", 5632)
        if qwen
        else 0,
        decoder_sparse_step=step,
        mlp_only_layers=sorted(only),
        router_aux_loss_coef=float(raw.get("router_aux_loss_coef", 0.001)),
        output_router_logits=raw.get("output_router_logits", False),
    )


MOE_KEYS = {
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "router_aux_loss_coef",
    "output_router_logits",
    "router_jitter_noise",
}


def builtin_config_dir() -> Path:
    """The folder of configs shipped with einplan (``configs/`` in the repository)."""
    return Path(__file__).resolve().parent.parent / "configs"


def read_config(source: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The raw JSON object of a config (dict, JSON file, model folder or built-in name such
    as ``"tiny"``) and where it came from, for error messages."""
    if isinstance(source, dict):
        return source, "config"
    path = Path(source)
    if not path.exists() and not path.suffix and (builtin_config_dir() / f"{source}.json").exists():
        path = builtin_config_dir() / f"{source}.json"
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        names = ", ".join(p.stem for p in sorted(builtin_config_dir().glob("*.json")))
        raise ConfigError(
            f"config file {str(source)!r} not found (give a path to a JSON config, "
            f"a model folder with config.json, or a built-in name: {names})"
        )
    try:
        return json.loads(path.read_text()), str(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def config_sections(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The pass sections (``lora``, ``quant``) a config carries besides the model."""
    raw, _ = read_config(source)
    return {k: raw[k] for k in SECTIONS if isinstance(raw, dict) and k in raw}


# Fields that change what the weights compute; two configs that differ in one are different
# models even when every tensor has the same shape.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "tie_word_embeddings",
    "qkv_bias",
    "rope_theta",
    "rope_scaling",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "shared_expert_intermediate_size",
    "decoder_sparse_step",
    "mlp_only_layers",
)


def config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """The architecture fields on which two configs disagree, as ``field: a vs b``."""
    out = []
    for name in ARCHITECTURE_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        same = abs(x - y) <= 1e-6 * abs(x) if isinstance(x, float) else x == y
        if not same:
            out.append(f"{name}: {x!r} vs {y!r}")
    return out


def load_config(source: str | Path | dict[str, Any]) -> ModelConfig:
    """Load a model config from a dict, a JSON file, or a built-in name such as ``"tiny"``."""
    raw, origin = read_config(source)
    return parse_config(raw, origin)


ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}


def hf_eos(eos: list[int]) -> int | list[int] | None:
    """``eos_token_id`` as Hugging Face writes it: one id, a list of several, or None (a byte
    tokenizer has no end-of-sequence token; an empty list breaks transformers' generate)."""
    if not eos:
        return None
    return eos[0] if len(eos) == 1 else list(eos)


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A Hugging Face ``config.json`` for the model, written beside checkpoints so that
    transformers (and einplan) can load them."""
    raw: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) or None,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": hf_eos(cfg.eos_token_id),
        "torch_dtype": "float32",
        "max_batch": cfg.max_batch,
        "name": cfg.name,
    }
    if cfg.model_type == "qwen2_moe":
        raw["qkv_bias"] = cfg.qkv_bias
    elif cfg.model_type != "qwen2":
        raw["attention_bias"] = cfg.qkv_bias
    if cfg.model_type == "mixtral":
        raw.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok)
    elif cfg.model_type == "qwen2_moe":
        raw.update(
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob,
            shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
            decoder_sparse_step=cfg.decoder_sparse_step,
            mlp_only_layers=list(cfg.mlp_only_layers),
        )
    if cfg.num_experts:
        raw.update(
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            output_router_logits=cfg.output_router_logits,
        )
    return raw


def to_hf_generation_config(cfg: ModelConfig) -> dict[str, Any]:
    """A Hugging Face ``generation_config.json``: the special ids transformers' ``generate``
    reads, each left out when the model has none (as transformers writes it)."""
    raw = {"bos_token_id": cfg.bos_token_id, "eos_token_id": hf_eos(cfg.eos_token_id)}
    return {k: v for k, v in raw.items() if v is not None}
