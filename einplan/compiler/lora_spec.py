"""LoRA options: ``--lora r=8,alpha=16,targets=q,k,v,o,dropout=0.05`` or a config section.

Targets name projections by role (q, k, v, o, gate, up, down, lm_head) or by their Hugging
Face module names (q_proj, ..., lm_head), as PEFT's ``target_modules`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from einplan.errors import EinplanError, check_section

# target name -> role of the projection in models/llama.py
TARGETS = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_o",
    "gate": "ffn_gate",
    "up": "ffn_up",
    "down": "ffn_down",
    "lm_head": "output",
}
MODULES = {  # role -> Hugging Face / PEFT module name
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_o": "o_proj",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
    "output": "lm_head",
}
ROLE_OF_NAME = {**TARGETS, **{m: r for r, m in MODULES.items()}}


class LoraError(EinplanError):
    """LoRA options, adapters or their base model do not fit."""


@dataclass(frozen=True)
class LoraConfig:
    """Rank, scaling numerator, targeted roles and dropout of a LoRA adapter."""

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attn_q", "attn_v")  # roles
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        """The factor alpha / r on the low-rank branch."""
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the plan file (targets by short name)."""
        short = {v: k for k, v in TARGETS.items()}
        return {
            "r": self.r,
            "alpha": self.alpha,
            "targets": [short[t] for t in self.targets],
            "dropout": self.dropout,
        }


def _split_option(text: str) -> dict[str, Any]:
    """``r=8,alpha=16,targets=q,k,v`` -> {r: "8", alpha: "16", targets: ["q", "k", "v"]}."""
    out: dict[str, Any] = {}
    key = None
    for token in text.split(","):
        token = token.strip()
        if "=" in token:
            key, value = (s.strip() for s in token.split("=", 1))
            out[key] = [value] if key == "targets" else value
        elif key == "targets" and token:
            out["targets"].append(token)
        elif token:
            raise LoraError(f"--lora {text!r}: {token!r} is not KEY=VALUE")
    return out


def _number(raw: dict, key: str, kind: type, default: Any) -> Any:
    """``raw[key]`` (text or number) as an int or float, or a clear error."""
    value = raw.get(key, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        number = kind(value)
        if float(value) != number:
            raise ValueError
    except (TypeError, ValueError):
        raise LoraError(f"LoRA {key} must be a {kind.__name__}, got {value!r}") from None
    return number


def parse_lora(raw: str | dict[str, Any] | None) -> LoraConfig | None:
    """Check LoRA options given as ``--lora`` text or as a config section."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = _split_option(raw)
    check_section(raw, ("r", "alpha", "targets", "dropout"), "LoRA options", LoraError)
    r = _number(raw, "r", int, 8)
    alpha = _number(raw, "alpha", float, 16.0)
    dropout = _number(raw, "dropout", float, 0.0)
    if r < 1:
        raise LoraError(f"LoRA rank r must be at least 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise LoraError(f"LoRA dropout must lie in [0, 1), got {dropout}")
    names = raw.get("targets", ["q", "v"])
    if isinstance(names, str):
        names = names.split(",")
    roles = []
    for name in names:
        if name not in ROLE_OF_NAME:
            raise LoraError(
                f"LoRA target {name!r} names no projection (known: {', '.join(TARGETS)}, "
                f"or {', '.join(MODULES.values())})"
            )
        if ROLE_OF_NAME[name] not in roles:
            roles.append(ROLE_OF_NAME[name])
    if not roles:
        raise LoraError("LoRA needs at least one target")
    return LoraConfig(r, alpha, tuple(roles), dropout)
