"""Chat prompts: a model's chat template (Jinja, from tokenizer_config.json or GGUF metadata)
rendered with a sandboxed Jinja2 environment, as transformers' apply_chat_template does."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from einplan.errors import EinplanError


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
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=_token_text(tokenizer_config.get("bos_token")),
            eos_token=_token_text(tokenizer_config.get("eos_token")),
        )
    except TemplateError as e:
        raise EinplanError(f"chat template failed to render: {e}") from None
