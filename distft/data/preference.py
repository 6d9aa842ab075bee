"""Preference records -> `Pair` samples (TRL's "preference" dataset forms).

A record with `chosen` and `rejected` is a preference pair, in one of three forms:

a. `{"prompt": str, "chosen": str, "rejected": str}`: two `Completion`s of the prompt.
b. `{"prompt": [messages], "chosen": str | [messages], "rejected": str | [messages]}`: the
   prompt is a conversation (an optional system message, then user and assistant turns in
   turn, ending with a user turn); a side is the assistant's reply, as a string or as the
   reply's messages. Each side becomes the `Conversation` prompt + reply.
c. `{"chosen": [messages], "rejected": [messages]}` (implicit prompt): two whole
   conversations that differ only in what follows their shared messages.

For conversations the prompt is always the messages both sides share (the longest common
prefix; in form b the given prompt and, if both replies start alike, more); the reply is
the rest of a side, starting and ending with an assistant message. An optional `system`
field heads both conversations (not with a string prompt, nor with a prompt that has its
own system message).

Only the replies are trained, whatever `data.train_on` says: a pair compares the two
replies to one prompt (`reply_turns` tells the encoder which assistant turns they are).
Bad pairs raise ValueError (the reader adds `file:line`): a missing side, identical sides,
an empty response, a prompt that does not end with a user turn, sides that differ before
their replies, turns that do not alternate.
"""

from __future__ import annotations

from typing import Any

from distft.data.formats import (
    ROLES,
    Completion,
    Conversation,
    Fields,
    Pair,
    check_turn,
    field_text,
    message,
)

Messages = list[dict[str, str]]


def to_pair(record: dict[str, Any], source: str, f: Fields) -> Pair:
    """The record as a `Pair`; ValueError (without the source) if it is a bad pair."""
    keys = f("chosen"), f("rejected")
    for key in keys:
        if record.get(key) is None:
            raise ValueError(f"missing field '{key}': a preference pair needs both sides")
    prompt = record.get(f("prompt"))
    if isinstance(prompt, str) or (prompt is None and isinstance(record[keys[0]], str)):
        return _completions(record, source, f)
    system = field_text(record, f("system"), required=False)
    if prompt is None:  # form c: two whole conversations
        sides = [_messages(record[k], k, f, _head(system)) for k in keys]
    else:  # form b: a prompt conversation and two replies
        head = _messages(prompt, f("prompt"), f, _head(system))
        if head[-1]["role"] != "user":
            raise ValueError(f"field '{f('prompt')}': the prompt must end with a user turn")
        sides = [_reply(record[k], k, f, head) for k in keys]
    chosen, rejected = sides
    if chosen == rejected:
        raise ValueError(f"'{keys[0]}' and '{keys[1]}' are identical: nothing to prefer")
    n = shared_prompt(chosen, rejected)
    for key, side, other in ((keys[0], chosen, keys[1]), (keys[1], rejected, keys[0])):
        _check_reply(side, n, key, other)
    return Pair(source, Conversation(source, chosen), Conversation(source, rejected))


def shared_prompt(chosen: Messages, rejected: Messages) -> int:
    """How many leading messages the two sides share: their prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n


def reply_turns(pair: Pair) -> tuple[int, int]:
    """How many assistant turns the reply of each conversation side holds (chosen,
    rejected): the trained turns, the last ones of the side."""
    assert isinstance(pair.chosen, Conversation) and isinstance(pair.rejected, Conversation)
    chosen, rejected = pair.chosen.messages, pair.rejected.messages
    n = shared_prompt(chosen, rejected)
    turns = [sum(m["role"] == "assistant" for m in side[n:]) for side in (chosen, rejected)]
    return turns[0], turns[1]


def _completions(record: dict[str, Any], source: str, f: Fields) -> Pair:
    """Form a: a string prompt and two string answers."""
    pkey, (ckey, rkey) = f("prompt"), (f("chosen"), f("rejected"))
    if f("prompt") not in record:
        raise ValueError(
            f"missing field '{pkey}': string sides need a prompt (or give '{ckey}' and "
            f"'{rkey}' as two whole conversations)"
        )
    if field_text(record, f("system"), required=False):
        raise ValueError(
            f"field '{f('system')}': a string prompt has no system message; give "
            f"'{pkey}' as messages"
        )
    prompt = field_text(record, pkey)
    chosen, rejected = field_text(record, ckey), field_text(record, rkey)
    for key, text in ((ckey, chosen), (rkey, rejected)):
        if not text.strip():
            raise ValueError(f"field '{key}': empty response")
    if chosen == rejected:
        raise ValueError(f"'{ckey}' and '{rkey}' are identical: nothing to prefer")
    return Pair(source, Completion(source, prompt, chosen), Completion(source, prompt, rejected))


def _head(system: str) -> Messages:
    return [{"role": "system", "content": system}] if system else []


def _messages(value: Any, key: str, f: Fields, head: Messages) -> Messages:
    """`head` and the message list `value` of field `key`, turns checked."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"field '{key}' must be a non-empty list of messages")
    first = value[0]
    if head and isinstance(first, dict) and first.get(f("role")) == "system":
        raise ValueError(f"field '{f('system')}' and a system message in '{key}': give one")
    return _append(head, value, key, f)


def _reply(value: Any, key: str, f: Fields, prompt: Messages) -> Messages:
    """The prompt and the reply `value` (a string: the assistant's answer; or messages)."""
    if isinstance(value, str):
        return [*prompt, {"role": "assistant", "content": field_text({key: value}, key)}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"field '{key}' must be a string or a non-empty list of messages")
    return _append(prompt, value, key, f)


def _append(head: Messages, value: list[Any], key: str, f: Fields) -> Messages:
    out = list(head)
    mapping = {r: r for r in ROLES}
    for i, m in enumerate(value):
        out.append(message(m, f"{key}[{i}]", f("role"), f("content"), mapping))
        check_turn(out, f"{key}[{i}].{f('role')}", m[f("role")])
    return out


def _check_reply(side: Messages, n: int, key: str, other: str) -> None:
    """The reply of `side` (after the `n` shared messages) is usable."""
    reply = side[n:]
    if not reply:
        raise ValueError(f"'{key}' has no reply after the messages it shares with '{other}'")
    if reply[0]["role"] != "assistant":
        raise ValueError(
            f"'{key}' and '{other}' differ at message {n} ({reply[0]['role']}), before "
            "their final assistant replies: a pair's sides share their prompt"
        )
    if reply[-1]["role"] != "assistant":
        raise ValueError(f"'{key}': the reply must end with an assistant message")
    for m in reply:
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"'{key}': empty response")
