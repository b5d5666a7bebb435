"""Symbolic dimensions and the size polynomials built from them.

A dimension is an ``int`` or a name (``"batch"``, ``"seq"``) bound when a plan
runs. FLOP and byte counts of a step are polynomials in those names, kept as
``{(sorted names...): coefficient}`` so a plan states its costs once and every
run evaluates them for its own batch and sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

Dim = int | str
Shape = tuple[Dim, ...]
Poly = dict[tuple[str, ...], int]


def numel(shape: Iterable[Dim]) -> Poly:
    """Return the element count of a (possibly symbolic) shape as a polynomial."""
    coef, names = 1, []
    for d in shape:
        if isinstance(d, str):
            names.append(d)
        else:
            coef *= int(d)
    return {tuple(sorted(names)): coef} if coef else {}


def add_polys(*polys: Poly) -> Poly:
    """Return the sum of polynomials."""
    out: Poly = {}
    for p in polys:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return {k: v for k, v in out.items() if v}


def scale_poly(p: Poly, factor: int) -> Poly:
    """Return ``p`` multiplied by an integer."""
    return {k: v * factor for k, v in p.items() if v * factor}


def evaluate(p: Poly, dims: Mapping[str, int]) -> int:
    """Evaluate a polynomial for bound dimension values."""
    total = 0
    for names, coef in p.items():
        term = coef
        for n in names:
            term *= dims[n]
        total += term
    return total


def resolve_shape(shape: Iterable[Dim], dims: Mapping[str, int]) -> tuple[int, ...]:
    """Return the concrete shape for bound dimension values."""
    return tuple(dims[d] if isinstance(d, str) else d for d in shape)


def poly_to_json(p: Poly) -> list:
    """Serialise a polynomial for the plan file."""
    return [[coef, list(names)] for names, coef in sorted(p.items())]


def poly_from_json(data: list) -> Poly:
    """Read a polynomial written by :func:`poly_to_json`."""
    return {tuple(names): int(coef) for coef, names in data}
