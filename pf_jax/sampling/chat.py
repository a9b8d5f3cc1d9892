"""Prompt text -> token ids through the model's own tokenizer, with its chat template when it has one."""

from __future__ import annotations

from typing import Any

from pf_jax.config.errors import ConfigError

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": "..."}


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer: Any, prompt: str | list[Message], *, chat_template: bool | None = None) -> list[int]:
    """Token ids of a prompt (a string, or a conversation as a list of {"role", "content"} messages).

    chat_template: None = use the tokenizer's template when it has one; True = require it (an error names
    the tokenizer otherwise); False = plain tokenization of the string (the tokenizer's own special
    tokens, e.g. BOS, included). With the template, the generation prompt for the assistant is appended.
    """
    use_template = has_chat_template(tokenizer) if chat_template is None else chat_template
    if use_template:
        if not has_chat_template(tokenizer):
            raise ConfigError(f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')}) "
                             "has no chat template; pass chat_template=False for plain tokenization")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template writes its own BOS / turn markers; do not add special tokens a second time.
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    if not isinstance(prompt, str):
        raise ConfigError("a conversation (list of messages) needs a chat template; got chat_template=False")
    return list(tokenizer(prompt).input_ids)
