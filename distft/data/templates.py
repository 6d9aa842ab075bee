"""Chat templates: the tokenizer's own (default) or a named built-in one.

Built-in templates are for tokenizers without a template (base models). Each is
prefix-consistent (rendering turns[:k] with the generation prompt is a string prefix of
rendering turns[:k+1] when turn k is the assistant's), which label masking relies on, and
each needs its marker tokens to be single tokens of the tokenizer.
"""

from __future__ import annotations

from typing import Any

from distft.data.records import DataError


class TemplateError(DataError):
    """No usable chat template: a setup problem, never skipped as a bad record."""


BUILTIN: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ("<|im_start|>", "<|im_end|>"),
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
}


def chat_template(tokenizer: Any, name: str) -> str:
    """The Jinja template to render conversations with; DataError if unusable."""
    if name == "tokenizer":
        template = getattr(tokenizer, "chat_template", None)
        if not isinstance(template, str) or not template:
            raise TemplateError(
                f"data.chat_template: tokenizer {tokenizer.name_or_path!r} has no chat "
                f"template; set data.chat_template to one of {', '.join(BUILTIN)}"
            )
        return template
    template, markers = BUILTIN[name]
    missing = [m for m in markers if len(tokenizer(m, add_special_tokens=False).input_ids) != 1]
    if missing:
        raise TemplateError(
            f"data.chat_template: {name!r} needs the special tokens {', '.join(missing)}, "
            f"which tokenizer {tokenizer.name_or_path!r} does not have as single tokens"
        )
    return template
