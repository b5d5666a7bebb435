"""Quantisation schemes: what ``--quant w4a16 --group-size 64`` means, checked once.

``wXaY``: weights stored as X-bit integers (int8 per output channel, int4 per group of
``group_size`` inputs, two values per byte), einsum inputs fake-quantised to Y bits (16: left
in float). Symmetric weights store ``q`` with ``w = s * q``; asymmetric ones an integer zero
point ``z`` with ``w = s * (q - z)``. Activation scales are per token and computed on the fly
(``dynamic``) or one per projection input measured on calibration text (``static``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from einplan.errors import EinplanError, check_section

SCHEMES = {"w8a16": (8, 16), "w4a16": (4, 16), "w8a8": (8, 8), "w4a4": (4, 4), "w8a4": (8, 4)}
GROUP_SIZES = (32, 64, 128)
ACTIVATION_MODES = ("dynamic", "static")


class QuantError(EinplanError):
    """A quantisation scheme, its options or quantised weights do not fit."""


@dataclass(frozen=True)
class QuantConfig:
    """One quantisation scheme with its options."""

    scheme: str
    group_size: int = 64
    symmetric: bool = True
    activations: str = "dynamic"

    @property
    def weight_bits(self) -> int:
        """Bits per stored weight (8 or 4)."""
        return SCHEMES[self.scheme][0]

    @property
    def act_bits(self) -> int:
        """Bits of the fake-quantised einsum inputs (16: not quantised)."""
        return SCHEMES[self.scheme][1]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the plan file and config sections."""
        return asdict(self)


def parse_quant(raw: str | dict[str, Any] | None, origin: str = "quant") -> QuantConfig | None:
    """Check a scheme name (``"w4a16"``) or a config section (``{"scheme": ..., ...}``)."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"scheme": raw}
    check_section(raw, ("scheme", "group_size", "symmetric", "activations"), origin, QuantError)
    scheme = str(raw.get("scheme", "")).lower()
    if scheme not in SCHEMES:
        raise QuantError(
            f"{origin}: unknown quantisation scheme {raw.get('scheme')!r} "
            f"(known: {', '.join(SCHEMES)})"
        )
    group = raw.get("group_size", 64)
    if group not in GROUP_SIZES or isinstance(group, bool):
        raise QuantError(
            f"{origin}: group size {group!r} is not one of {', '.join(map(str, GROUP_SIZES))}"
        )
    symmetric = raw.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise QuantError(f"{origin}: symmetric must be true or false, got {symmetric!r}")
    mode = raw.get("activations", "dynamic")
    if mode not in ACTIVATION_MODES:
        raise QuantError(
            f"{origin}: activations {mode!r} is not one of {', '.join(ACTIVATION_MODES)}"
        )
    if mode == "static" and SCHEMES[scheme][1] == 16:
        raise QuantError(f"{origin}: {scheme} quantises no activations; static scales need a8/a4")
    return QuantConfig(scheme, group, symmetric, mode)


def weight_group(cfg: QuantConfig, n_in: int, where: str) -> int:
    """The group length along the input axis of one weight: all of it for int8 (one scale per
    output channel), ``group_size`` for int4, which must divide the input width."""
    if cfg.weight_bits == 8:
        return n_in
    if n_in % cfg.group_size:
        fits = [str(g) for g in GROUP_SIZES if n_in % g == 0]
        hint = f"use --group-size {' or '.join(fits)}" if fits else "int4 cannot store it; use w8"
        raise QuantError(
            f"{where}: group size {cfg.group_size} does not divide its input width {n_in}; {hint}"
        )
    return cfg.group_size


def stored_layout(bits: int, group: int, symmetric: bool, shape: tuple[int, int]) -> dict:
    """Shapes and dtypes of the packed tensors of one (out, in) weight: the integers, one scale
    per (output row, group), and for asymmetric weights one zero point per (row, group)."""
    out, n_in = shape
    parts = {
        "q": ((out, n_in if bits == 8 else n_in // 2), "i8" if bits == 8 and symmetric else "u8"),
        "scale": ((out, n_in // group), "f32"),
    }
    if not symmetric:
        parts["zero_point"] = ((out, n_in // group), "u8")
    return parts


def input_absmax_key(weight_key: str) -> str:
    """Where a projection's static activation range is stored: ``...q_proj.input_absmax``."""
    return weight_key.removesuffix(".weight") + ".input_absmax"
