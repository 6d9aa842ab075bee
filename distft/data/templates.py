"""Chat templates: the tokenizer's own (default) or a named built-in one, and where each
assistant turn lies in a rendered conversation (label masking).

Built-in templates are for tokenizers without a template (base models); each needs its
marker tokens to be single tokens of the tokenizer.

Locating the assistant turns (`conversation_spans`) works with any template, also ones that
are not prefix-consistent (Qwen3 drops the reasoning of earlier turns, Phi-3 ends a
finished conversation with EOS, Mistral v0.3/Nemo put the system prompt into the last user
message only):

1. The training text is the template's render of the whole conversation. Exception: when
   the template leaves the system message out of a conversation that ends with the
   assistant (Mistral v0.3/Nemo), the text is the inference prompt of the last assistant
   turn (rendered with the generation prompt, so it holds the system prompt where inference
   puts it) followed by that turn as the full render writes it.
2. A turn's content span: render again with the turn's content replaced by a sentinel (a
   string of private-use characters); the common prefix and suffix of the two renders bound
   the text that depends on the content, whatever the template does to it (trim, reasoning
   split). The sentinel must appear exactly once in its render's differing part, or the
   template renders the content non-locally: DataError. (A second sentinel, differing at
   both ends, is tried when the content itself starts or ends like the first.)
3. The span is extended over the end-of-turn marker: optional whitespace, then a special
   token of the tokenizer (`<|eot_id|>`, `<|im_end|>`, `</s>`, `<end_of_turn>`, `<|end|>`),
   when one follows the content. Nothing else of the template is trained.

A template that raises (Gemma-2: 'System role not supported') refuses that record: a
`DataError` naming `file:line`, which `on_bad_record: skip` skips. A template that does not
parse is a setup problem (`TemplateError`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import jinja2

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

# Private-use characters: not in real text, no whitespace to trim, and the two sentinels
# differ in their first and in their last character (see `_content_span`).
SENTINELS = ("\ue000\ue001\ue002", "\ue003\ue004\ue005")

Messages = list[dict[str, str]]
Span = tuple[int, int]


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


def render(
    tokenizer: Any, messages: Messages, template: str | None, source: str, gen: bool = False
) -> str:
    """The template's text for `messages`; a template that refuses them is a DataError."""
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen, chat_template=template
        )
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(
            f"data.chat_template: the chat template of tokenizer {tokenizer.name_or_path!r} "
            f"does not parse: {e.message} (template line {e.lineno})"
        ) from None
    except (jinja2.TemplateError, ValueError) as e:  # raise_exception(...), or transformers'
        raise DataError(f"{source}: the chat template refuses this conversation: {e}") from None
    return str(text)


def end_markers(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's special tokens (longest first): what may end an assistant turn."""
    return _end_markers(tokenizer, len(tokenizer))  # tokens added later change the length


@lru_cache(maxsize=16)
def _end_markers(tokenizer: Any, size: int) -> tuple[str, ...]:
    names = set(tokenizer.all_special_tokens)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names.update(t.content for t in decoder.values() if getattr(t, "special", False))
    return tuple(sorted((n for n in names if n), key=len, reverse=True))


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n  # binary search on slices: fast for long renders
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str, limit: int) -> int:
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _with_content(messages: Messages, i: int, content: str) -> Messages:
    return [*messages[:i], {**messages[i], "content": content}, *messages[i + 1 :]]


Render = Callable[[Messages], str]


def _content_span(draw: Render, messages: Messages, i: int, text: str, source: str) -> Span:
    """[start, end) of the text of `draw(messages)` (= `text`) that depends on message i."""
    for sentinel in SENTINELS:
        other = draw(_with_content(messages, i, sentinel))
        p = _common_prefix(text, other)
        s = _common_suffix(text, other, min(len(text), len(other)) - p)
        # Exactly one whole sentinel between the common parts: [p, len - s) is the content's
        # text. Content that starts or ends like the sentinel pushes p or s into it (no
        # whole sentinel left): the second sentinel, which differs at both ends, is exact.
        if other[p : len(other) - s].count(sentinel) == 1:
            return p, len(text) - s
    raise DataError(
        f"{source}: the chat template does not render message {i} ({messages[i]['role']}) "
        "as one piece of text, so the turn cannot be located for label masking"
    )


def _drops(draw: Render, messages: Messages, i: int, text: str) -> bool:
    """True when the template leaves message i's content out of `text`."""
    return (
        bool(messages[i]["content"].strip())
        and draw(_with_content(messages, i, SENTINELS[0])) == text
    )


def _extend(text: str, span: Span, markers: tuple[str, ...]) -> Span:
    """`span` and the end-of-turn marker after it: whitespace, then a special token."""
    start, end = span
    after = len(text[end:]) - len(text[end:].lstrip())
    for marker in markers:
        if text.startswith(marker, end + after):
            return start, end + after + len(marker)
    return span


def end_of_turn(tokenizer: Any, template: str | None = None) -> str | None:
    """The special token that ends an assistant turn in the template (`<|eot_id|>`,
    `<|im_end|>`, `<end_of_turn>`, `</s>` ...): the marker that masking trains after a
    turn's content (`_extend`). None without a template, when the template refuses a plain
    user/assistant exchange, or when no special token follows the content."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]

    def full(msgs: Messages) -> str:
        return render(tokenizer, msgs, template, "end_of_turn")

    try:
        text = full(messages)
        start, end = _content_span(full, messages, 1, text, "end_of_turn")
    except DataError:  # TemplateError included: no usable template, nothing to stop at
        return None
    _, extended = _extend(text, (start, end), end_markers(tokenizer))
    return text[end:extended].strip() or None


def conversation_spans(
    tokenizer: Any,
    messages: Messages,
    source: str,
    train_on: str = "assistant",
    template: str | None = None,
) -> tuple[str, list[Span]]:
    """The training text of a conversation and the [start, end) character spans that are
    trained (see the module docstring for the rules)."""

    def full(msgs: Messages) -> str:
        return render(tokenizer, msgs, template, source)

    text = full(messages)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    last = assistant[-1] if assistant else -1
    system = [i for i, m in enumerate(messages[:last]) if m["role"] == "system"]
    spliced = last == len(messages) - 1 and any(_drops(full, messages, i, text) for i in system)
    if spliced:
        text, spans = _spliced(tokenizer, messages, template, source, text, train_on)
    elif train_on == "all":
        return text, [(0, len(text))]
    else:
        turns = assistant[-1:] if train_on == "last_assistant_turn" else assistant
        spans = [_content_span(full, messages, i, text, source) for i in turns]
    markers = end_markers(tokenizer)
    return text, [_extend(text, span, markers) for span in spans]


def _spliced(
    tokenizer: Any,
    messages: Messages,
    template: str | None,
    source: str,
    text: str,
    train_on: str,
) -> tuple[str, list[Span]]:
    """Text and content spans when the full render leaves out the system message: the
    inference prompt of the last (assistant) turn, then that turn from the full render."""
    last = len(messages) - 1

    def prompt_of(msgs: Messages) -> str:
        return render(tokenizer, msgs[:last], template, source, gen=True)

    def full(msgs: Messages) -> str:
        return render(tokenizer, msgs, template, source)

    prompt = prompt_of(messages)
    system = [i for i, m in enumerate(messages[:last]) if m["role"] == "system"]
    if any(_drops(prompt_of, messages, i, prompt) for i in system):
        raise DataError(f"{source}: the chat template leaves out the system message")
    # Where the last turn starts in the full render: after the message before it and the
    # same template text that follows that message in the prompt (the generation prompt).
    _, before_end = _content_span(full, messages, last - 1, text, source)
    _, prompt_end = _content_span(prompt_of, messages, last - 1, prompt, source)
    tail = prompt[prompt_end:]
    start, end = _content_span(full, messages, last, text, source)
    if not text.startswith(tail, before_end) or before_end + len(tail) > start:
        raise DataError(
            f"{source}: the chat template renders the last assistant turn differently from "
            "its generation prompt, so the turn cannot be located for label masking"
        )
    shift = len(prompt) - (before_end + len(tail))
    out = prompt + text[before_end + len(tail) :]
    if train_on == "all":
        return out, [(0, len(out))]
    spans = [(start + shift, end + shift)]
    if train_on == "assistant":
        earlier = [i for i, m in enumerate(messages[:last]) if m["role"] == "assistant"]
        spans = [_content_span(prompt_of, messages, i, prompt, source) for i in earlier] + spans
    return out, spans
