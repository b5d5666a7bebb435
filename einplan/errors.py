"""The base of every error einplan raises on bad input; the CLI turns these into a message and
a non-zero exit instead of a traceback."""


class EinplanError(ValueError):
    """Bad input: a config, plan, weights file, tokenizer or array that does not fit."""


def check_section(raw: object, known: tuple[str, ...], what: str, error: type) -> dict:
    """``raw`` as an options object whose keys are all ``known``, or ``error`` naming ``what``
    and the unknown keys (config sections and their command-line forms)."""
    if not isinstance(raw, dict):
        raise error(f"{what} must be an object, got {raw!r}")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise error(f"{what}: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})")
    return raw
