"""Chat prompts: a model's chat template (Jinja, from tokenizer_config.json or GGUF metadata)
rendered with a sandboxed Jinja2 environment, as transformers' apply_chat_template does."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from einplan.errors import EinplanError

# A template renders a prompt of a few kilobytes in milliseconds; these bounds stop one that loops
# or grows without end (the sandbox alone stops neither).
MAX_PROMPT_CHARS = 1 << 20
MAX_SECONDS = 2.0
MAX_SEQUENCE = 1 << 20  # items a string or list built by * or ** may have


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with a deadline (checked at each output chunk and each ``range`` step) and
    a cap on what ``*`` and ``**`` make."""

    intercepted_binops = frozenset(["*", "**"])

    def __init__(self, seconds: float) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        self.deadline = time.monotonic() + seconds
        self.globals["range"] = self.bounded_range
        self.globals["raise_exception"] = _raise

    def check_time(self) -> None:
        """Stop the render once its time is up."""
        if time.monotonic() > self.deadline:
            raise EinplanError(
                f"chat template: rendering took over {MAX_SECONDS:g} s (a loop without end?)"
            )

    def bounded_range(self, *args: int) -> Iterator[int]:
        """``range`` whose every step checks the deadline."""
        for i in range(*args):
            self.check_time()
            yield i

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """``*`` and ``**``, refused when the result would be huge."""
        if operator == "*" and isinstance(right, str | list | tuple):
            left, right = right, left
        if operator == "*" and isinstance(left, str | list | tuple) and isinstance(right, int):
            if len(left) * right > MAX_SEQUENCE:
                raise EinplanError(f"chat template: a sequence of {len(left) * right:,} items")
        if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise EinplanError(f"chat template: power {right} is too large")
        return super().call_binop(context, operator, left, right)


def _raise(message: str) -> None:
    raise EinplanError(f"chat template: {message}")


def _token_text(value: Any) -> str:
    """Special tokens in tokenizer_config.json are strings or {"content": ...} objects."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def render_chat(tokenizer_config: dict[str, Any], messages: list[dict[str, str]]) -> str:
    """The prompt text for ``messages`` (role/content dicts), ending where the assistant's
    reply begins."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        raise EinplanError(
            "the model has no chat template (tokenizer_config.json 'chat_template'); "
            "use --prompt instead of --chat"
        )
    env = BoundedEnvironment(MAX_SECONDS)
    chunks: list[str] = []
    size = 0
    try:
        for chunk in env.from_string(template).generate(
            messages=messages,
            add_generation_prompt=True,
            bos_token=_token_text(tokenizer_config.get("bos_token")),
            eos_token=_token_text(tokenizer_config.get("eos_token")),
        ):
            env.check_time()
            size += len(chunk)
            if size > MAX_PROMPT_CHARS:
                raise EinplanError(
                    f"chat template: the prompt grew past {MAX_PROMPT_CHARS:,} characters"
                )
            chunks.append(chunk)
        return "".join(chunks)
    except TemplateError as e:
        raise EinplanError(f"chat template failed to render: {e}") from None
