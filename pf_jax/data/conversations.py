"""Conversational rows, as TRL and the hub write them: a conversation is a list of messages
`{"role": "system" | "user" | "assistant" | "tool", "content": str}`.

    language modelling  {"messages": [...]}: SFT trains on its assistant turns; a sampling method takes
                        the messages before its trailing assistant turns as the prompt
    prompt-only         {"prompt": [...]}: the prompt of a sampling method
    preference          {"prompt": [...], "chosen": [...], "rejected": [...]} (explicit prompt), or
                        {"chosen": [...], "rejected": [...]} whose shared first messages are the prompt
    unpaired            {"prompt": [...], "completion": [...], "label": bool} (KTO)

A text field beside a message list is read as one message (a prompt as a user turn, a response as an
assistant turn). Everything here checks shapes; rendering with a chat template is pf_jax.data.chat_render's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pf_jax.data.rows import RowProblem

ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, str]


def is_conversation(value: Any) -> bool:
    """A field value that is a list (of messages, once checked)."""
    return isinstance(value, list)


def check_messages(value: Any, field: str) -> list[Message] | RowProblem:
    """The messages of `field` as plain {"role", "content"} dicts, or the problem with the first bad one."""
    if not isinstance(value, list) or not value:
        return RowProblem("bad conversation", f"field '{field}' must be a non-empty list of messages, got "
                                              f"{type(value).__name__} {value!r:.60}")
    out = []
    for i, message in enumerate(value):
        where = f"field '{field}' message {i}"
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            return RowProblem("bad conversation", f"{where} must be an object with 'role' and 'content', got {message!r:.80}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            return RowProblem("bad conversation", f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            return RowProblem("bad conversation", f"{where} content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def as_messages(value: Any, field: str, role: str) -> list[Message] | RowProblem:
    """A field that is text (one message of `role`) or a list of messages."""
    if isinstance(value, str):
        if not value.strip():
            return RowProblem("empty field", f"field '{field}' is empty")
        return [{"role": role, "content": value}]
    return check_messages(value, field)


def prompt_of(messages: list[Message]) -> list[Message]:
    """The messages before the trailing assistant turns: what a policy answers."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    return messages[:end]


def split_at_first_answer(messages: list[Message], field: str) -> tuple[list[Message], list[Message]] | RowProblem:
    """(the messages before the first assistant turn, the rest): SFT's prompt and its trained turns."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None:
        return RowProblem("no assistant turn", f"field '{field}' has no assistant message to train on")
    if first == 0:
        return RowProblem("no prompt", f"field '{field}' starts with an assistant message; a prompt must come first")
    return messages[:first], messages[first:]


def shared_prompt(chosen: list[Message], rejected: list[Message], fields: tuple[str, str]
                  ) -> tuple[list[Message], list[Message], list[Message]] | RowProblem:
    """(prompt, chosen completion, rejected completion) of two full conversations: the prompt is their
    common first messages, cut back to end before an assistant turn (TRL's implicit prompt)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and chosen[n - 1]["role"] == "assistant":
        n -= 1
    if n == 0:
        return RowProblem("no shared prompt", f"fields '{fields[0]}' and '{fields[1]}' share no first message: name the "
                                              "prompt in its own field")
    chosen_part, rejected_part = chosen[n:], rejected[n:]
    for name, part in zip(fields, (chosen_part, rejected_part), strict=True):
        if not part or part[0]["role"] != "assistant":
            return RowProblem("no assistant turn", f"field '{name}' has no assistant message after the shared prompt")
    return chosen[:n], chosen_part, rejected_part
