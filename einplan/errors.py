"""The base of every error einplan raises on bad input; the CLI turns these into a message and
a non-zero exit instead of a traceback."""


class EinplanError(ValueError):
    """Bad input: a config, plan, weights file, tokenizer or array that does not fit."""
