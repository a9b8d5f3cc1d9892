"""The check of each kind of row, text or conversational (pf_jax.data.conversations): what a valid row
becomes, or the RowProblem that names its field.

    prompt rows      {"prompt": text | messages, "answer"?: text}; a row with only `messages` gives the
                     prompt before its trailing assistant turns, or (SFT) {"prompt", "messages"}
    preference rows  {"prompt", "chosen", "rejected"}: all text, or messages (explicit or shared prompt)
    KTO rows         {"prompt", "completion", "label": bool}: text or messages
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pf_jax.data.chat_render import ChatTemplateError
from pf_jax.data.conversations import (
    Message,
    as_messages,
    check_messages,
    is_conversation,
    prompt_of,
    shared_prompt,
    split_at_first_answer,
)
from pf_jax.data.rows import RowCheck, RowProblem, check_text_field

CountTokens = Callable[[Any], int]
Render = Callable[[dict[str, Any]], Any]


def rendered(check: RowCheck, render: Render | None) -> RowCheck:
    """`check`, then `render` of the checked row (its tokens, through the chat template): a conversation the
    template cannot render is a bad row of its own, found when the data loads, not mid-run."""
    if render is None:
        return check

    def checked(row: Mapping[str, Any]) -> dict[str, Any] | RowProblem:
        out = check(row)
        if isinstance(out, RowProblem):
            return out
        try:
            render(out)
        except ChatTemplateError as error:
            return RowProblem("template error", str(error))
        return out

    return checked


def _present(row: Mapping[str, Any], field: str) -> bool:
    return row.get(field) is not None


def _fits(prompt: Any, count_tokens: CountTokens | None, max_prompt_tokens: int | None) -> RowProblem | None:
    if count_tokens is None or max_prompt_tokens is None:
        return None
    try:
        n = count_tokens(prompt)
    except ChatTemplateError as error:
        return RowProblem("template error", str(error))
    if n > max_prompt_tokens:
        return RowProblem("prompt too long", f"prompt has {n} tokens, more than max_prompt_tokens={max_prompt_tokens}")
    return None


def _prompt(row: Mapping[str, Any], prompt_field: str, messages_field: str, targets_in_messages: bool
            ) -> tuple[str | list[Message], list[Message] | None] | RowProblem:
    """(the prompt, the whole conversation when SFT trains on its turns)."""
    if _present(row, prompt_field):
        value = row[prompt_field]
        prompt = check_messages(value, prompt_field) if is_conversation(value) else check_text_field(row, prompt_field)
        return prompt if isinstance(prompt, RowProblem) else (prompt, None)
    if not _present(row, messages_field):
        return RowProblem("missing field", f"missing field '{prompt_field}' (or a conversation in '{messages_field}')")
    messages = check_messages(row[messages_field], messages_field)
    if isinstance(messages, RowProblem):
        return messages
    if targets_in_messages:
        split = split_at_first_answer(messages, messages_field)
        return split if isinstance(split, RowProblem) else (split[0], messages)
    prompt = prompt_of(messages)
    if not prompt:
        return RowProblem("no prompt", f"field '{messages_field}' holds only assistant messages")
    return prompt, None


def prompt_row_check(
    prompt_field: str = "prompt",
    answer_field: str | None = None,
    max_prompt_tokens: int | None = None,
    count_tokens: CountTokens | None = None,
    *,
    messages_field: str = "messages",
    targets_in_messages: bool = False,
) -> RowCheck:
    """Check for prompt rows -> {"prompt": text or messages, "answer": str (if answer_field)}, plus
    "messages" for a conversation SFT trains on (targets_in_messages: such a row needs no answer).

    The answer may be a string or a number (kept as its string). With `count_tokens` and
    `max_prompt_tokens`, a prompt with more tokens than the limit is a bad row.
    """

    def check(row: Mapping[str, Any]) -> dict[str, Any] | RowProblem:
        found = _prompt(row, prompt_field, messages_field, targets_in_messages)
        if isinstance(found, RowProblem):
            return found
        prompt, messages = found
        out: dict[str, Any] = {"prompt": prompt}
        if messages is not None:
            out["messages"] = messages
        elif answer_field is not None:
            answer = check_text_field(row, answer_field, allow_numbers=True)
            if isinstance(answer, RowProblem):
                return answer
            out["answer"] = answer
        return _fits(prompt, count_tokens, max_prompt_tokens) or out

    return check


def _conversational_pair(row: Mapping[str, Any], prompt_field: str, fields: tuple[str, str]
                         ) -> tuple[list[Message], list[Message], list[Message]] | RowProblem:
    for field in fields:
        if not _present(row, field):
            return RowProblem("missing field", f"missing field '{field}'")
    if not _present(row, prompt_field):  # the prompt is the conversations' shared first messages
        sides = [check_messages(row[f], f) for f in fields]
        problem = next((s for s in sides if isinstance(s, RowProblem)), None)
        return problem or shared_prompt(sides[0], sides[1], fields)
    prompt = as_messages(row[prompt_field], prompt_field, "user")
    sides = [as_messages(row[f], f, "assistant") for f in fields]
    problem = next((x for x in (prompt, *sides) if isinstance(x, RowProblem)), None)
    return problem or (prompt, sides[0], sides[1])


def preference_row_check(
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    max_prompt_tokens: int | None = None,
    count_tokens: CountTokens | None = None,
) -> RowCheck:
    """Check for preference rows -> {"prompt", "chosen", "rejected"} (all text, or all messages once any
    of them is a list); chosen == rejected is a bad row."""
    fields = (chosen_field, rejected_field)

    def check(row: Mapping[str, Any]) -> dict[str, Any] | RowProblem:
        if any(is_conversation(row.get(f)) for f in (prompt_field, *fields)):
            found = _conversational_pair(row, prompt_field, fields)
            if isinstance(found, RowProblem):
                return found
            out = dict(zip(("prompt", "chosen", "rejected"), found, strict=True))
        else:
            out = {}
            for name, field in zip(("prompt", "chosen", "rejected"), (prompt_field, *fields), strict=True):
                text = check_text_field(row, field)
                if isinstance(text, RowProblem):
                    return text
                out[name] = text
        if out["chosen"] == out["rejected"]:
            return RowProblem("identical pair", f"fields '{chosen_field}' and '{rejected_field}' are identical")
        return _fits(out["prompt"], count_tokens, max_prompt_tokens) or out

    return check


def kto_row_check(prompt_field: str = "prompt", completion_field: str = "completion", label_field: str = "label",
                  max_prompt_tokens: int | None = None, count_tokens: CountTokens | None = None) -> RowCheck:
    """Check for KTO rows -> {"prompt", "completion", "label": bool}: prompt and completion as text, or as
    messages once either is a list; the label a boolean (or 0 / 1)."""

    def check(row: Mapping[str, Any]) -> dict[str, Any] | RowProblem:
        for field in (prompt_field, completion_field, label_field):
            if not _present(row, field):
                return RowProblem("missing field", f"missing field '{field}'")
        label = row[label_field]
        if not isinstance(label, bool) and label not in (0, 1):
            return RowProblem("wrong type", f"field '{label_field}' must be true / false (or 1 / 0), got {label!r:.40}")
        if is_conversation(row[prompt_field]) or is_conversation(row[completion_field]):
            prompt = as_messages(row[prompt_field], prompt_field, "user")
            completion = as_messages(row[completion_field], completion_field, "assistant")
        else:
            prompt, completion = check_text_field(row, prompt_field), check_text_field(row, completion_field)
        problem = next((x for x in (prompt, completion) if isinstance(x, RowProblem)), None)
        if problem is not None:
            return problem
        return _fits(prompt, count_tokens, max_prompt_tokens) or {"prompt": prompt, "completion": completion,
                                                                 "label": bool(label)}

    return check
