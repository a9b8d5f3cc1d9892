"""Conversations rendered with a tokenizer's chat template into the training layout: the prompt's tokens,
then the completion's tokens with a mask of the ones a likelihood loss trains on.

The template is rendered once per turn boundary and the pieces are tokenized one by one, so the prompt
is exactly the tokens the sampler is given at inference (`add_generation_prompt=True`) and each assistant
turn is the tokens the model would generate: its content, then the template's end-of-turn token
(Gemma's `<end_of_turn>`, ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`) as the target's last token.
What the template writes after that token (a newline) and the other roles' turns are in the sequence
but not trained on. A template that rewrites earlier turns once later ones are added cannot be split
this way and is refused, naming the turn.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from pf_jax.config.errors import UserError
from pf_jax.data.conversations import Message

NAMED_TEMPLATES = {"gemma3": "gemma3.jinja", "qwen2.5": "qwen2.5.jinja"}
_PROBE = "pf-jax-probe"


class ChatTemplateError(UserError):
    """A chat template that is missing, unreadable, or cannot render a conversation."""


def named_chat_template(spec: str) -> str:
    """The Jinja text of a shipped template (gemma3: Google's Gemma 3 chat template; qwen2.5: Qwen2.5's) or
    of a `.jinja` file."""
    if spec in NAMED_TEMPLATES:
        return resources.files("pf_jax.data").joinpath("chat_templates", NAMED_TEMPLATES[spec]).read_text()
    path = Path(spec).expanduser()
    if path.suffix == ".jinja":
        try:
            return path.read_text()
        except OSError as error:
            raise ChatTemplateError(f"model.chat_template: cannot read {path}: {error.strerror or error}") from None
    raise ChatTemplateError(f"model.chat_template={spec!r} is neither a shipped template ({', '.join(NAMED_TEMPLATES)}) "
                            "nor a path to a .jinja file")


class ChatRenderer:
    """Renders conversations with `tokenizer`'s chat template (a transformers tokenizer that has one)."""

    def __init__(self, tokenizer: Any, name: str = "the tokenizer") -> None:
        self.tokenizer, self.name = tokenizer, name
        self.turn_end_text, self.turn_end_id = self._turn_end()

    def render(self, messages: list[Message], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as error:  # jinja's TemplateError, raise_exception in the template, a KeyError, ...
            raise ChatTemplateError(f"the chat template of {self.name} cannot render this conversation: "
                                    f"{type(error).__name__}: {error}") from None

    def ids(self, text: str) -> list[int]:
        """Token ids of template text: its special tokens as written, none added (it writes its own BOS)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The conversation so far, ending with the template's opening of an assistant turn."""
        return self.ids(self.render(messages, True))

    def _turn_end(self) -> tuple[str | None, int | None]:
        """The special token the template closes an assistant turn with (None: it writes none; the target
        then ends with EOS)."""
        user = [{"role": "user", "content": "x"}]
        opened = self.render(user, True)
        closed = self.render([*user, {"role": "assistant", "content": _PROBE}], False)
        after = closed[closed.rfind(_PROBE) + len(_PROBE):] if closed.startswith(opened) else ""
        ids = self.ids(after)
        added = getattr(self.tokenizer, "added_tokens_decoder", {})
        if ids and ids[0] in added and getattr(added[ids[0]], "special", False):
            return str(added[ids[0]]), ids[0]
        return None, None

    def completion(self, prompt: list[Message], completion: list[Message], *, assistant_only: bool,
                   eos_id: int) -> tuple[list[int], list[int], list[bool]]:
        """(prompt ids, completion ids, trained flags per completion id). assistant_only: train on the
        assistant turns of `completion` (content + end-of-turn token); else on every completion token."""
        prompt_text = self.render(prompt, True)
        out: list[int] = self.ids(prompt_text)
        response: list[int] = []
        trained: list[bool] = []
        done = prompt_text
        for i, message in enumerate(completion):
            history = [*prompt, *completion[: i + 1]]
            if message["role"] == "assistant":
                opened = self.render(history[:-1], True)
                _extend(response, trained, self.ids(self._since(done, opened, len(history) - 1)), False)
                turn = self._since(opened, self.render(history, False), len(history) - 1)
                body, rest = self._split_turn(turn)
                body_ids = self.ids(body) + ([] if self.turn_end_id is not None else [eos_id])
                _extend(response, trained, body_ids, True)
                _extend(response, trained, self.ids(rest), False)
                done = opened + turn
            else:
                full = self.render(history, False)
                _extend(response, trained, self.ids(self._since(done, full, len(history) - 1)), False)
                done = full
        while trained and not trained[-1]:  # what follows the last trained token is never predicted from
            response.pop()
            trained.pop()
        if not assistant_only:
            trained = [True] * len(response)
        return out, response, trained

    def _since(self, before: str, after: str, turn: int) -> str:
        if not after.startswith(before):
            raise ChatTemplateError(f"the chat template of {self.name} renders the conversation differently once "
                                    f"message {turn} is added, so its turns cannot be told apart for the loss")
        return after[len(before):]

    def _split_turn(self, turn: str) -> tuple[str, str]:
        """(content through the end-of-turn token, what the template writes after it)."""
        if self.turn_end_text is None:
            return turn.rstrip(), turn[len(turn.rstrip()):]
        cut = turn.rfind(self.turn_end_text) + len(self.turn_end_text)
        return turn[:cut], turn[cut:]


def _extend(ids: list[int], flags: list[bool], more: list[int], flag: bool) -> None:
    ids.extend(more)
    flags.extend([flag] * len(more))
