"""The researcher's-workflow features (issue 21) refuse bad input the way every CLI does: one line on
stderr naming the thing and what was expected, exit code 2, no traceback. One case per mistake; each
asserts the words of its message. Recipes are test_user_errors' tiny ones (one step, one layer)."""

import json
from pathlib import Path

import pytest

from tests.chat_fixtures import qwen_tokenizer, tiny_export
from tests.test_user_errors import generate_fails, train_fails, write

CHAT = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]


def rows(path: Path, *items: dict) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in items))


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny model whose tokenizer has Qwen2.5's chat template."""
    return tiny_export(tmp_path_factory.mktemp("chat_model"), qwen_tokenizer())


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory) -> Path:
    """A tiny model whose tokenizer has no chat template."""
    tokenizer = qwen_tokenizer()
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        return tiny_export(tmp_path_factory.mktemp("plain_model"), tokenizer)
    finally:
        tokenizer.chat_template = saved


# --- recipe keys: refused when the recipe loads ---------------------------------------------------------

KEY_CASES = {
    "empty-stop-string": (['rollout.stop=["\\n", ""]'], ["rollout.stop", "a stop string must not be empty"]),
    "two-held-out-sets": (["eval.source=held.jsonl", "eval.fraction=0.1"],
                          ["eval.source and eval.fraction name two held-out sets"]),
    "fraction-above-one": (["eval.fraction=1.5"], ["eval.fraction", "less than 1"]),
    "export-dtype-float16": (["export.dtype=float16"], ["export.dtype", "'float32' or 'bfloat16'"]),
    "push-to-hub-not-a-repo": (["export.push_to_hub=my-model"], ["export.push_to_hub", "pattern"]),
    "reward-on-error-skip": (["reward.on_error=skip"], ["reward.on_error", "'stop' or 'zero'"]),
    "completions-every-negative": (["logging.completions_every=-1"], ["logging.completions_every",
                                                                       "greater than or equal to 0"]),
    "packed-length-tiny": (["data.packed_length=4"], ["data.packed_length", "greater than or equal to 8"]),
    "packing-for-dpo": (["method.name=dpo", "data.source=arithmetic_pairs", "data.packing=true"],
                        ["data.packing=True belongs to SFT on dataset responses"]),
    "print-config-of-a-key": (["--print-config", "optimizer.lr"], ["'optimizer.lr' is not a section"]),
}


@pytest.mark.parametrize("case", KEY_CASES)
def test_recipe_key_mistakes(capsys, tmp_path, case):
    overrides, words = KEY_CASES[case]
    train_fails(capsys, tmp_path, overrides, *words)


# --- conversational rows: bad rows named by index and field -----------------------------------------------

ROW_CASES = {  # case: (method, the one row, words of the message)
    "unknown-role": ("sft", {"messages": [{"role": "bot", "content": "hi"}, CHAT[1]]},
                     ["bad row 0", "field 'messages' message 0 has role 'bot'", "system, user, assistant, tool"]),
    "messages-not-a-list": ("sft", {"messages": "What is two plus two?"},
                            ["field 'messages' must be a non-empty list of messages"]),
    "content-not-text": ("sft", {"messages": [{"role": "user", "content": 4}, CHAT[1]]},
                         ["field 'messages' message 0 content must be a string, got int"]),
    "message-without-role": ("sft", {"messages": [{"content": "hi"}, CHAT[1]]},
                             ["message 0 must be an object with 'role' and 'content'"]),
    "no-assistant-turn": ("sft", {"messages": [CHAT[0]]}, ["field 'messages' has no assistant message to train on"]),
    "assistant-first": ("sft", {"messages": [CHAT[1], CHAT[0]]}, ["starts with an assistant message"]),
    "no-shared-prompt": ("dpo", {"chosen": CHAT, "rejected": [{"role": "user", "content": "Other?"}, CHAT[1]]},
                         ["share no first message", "name the prompt in its own field"]),
    "pair-missing-rejected": ("dpo", {"prompt": "2+2?", "chosen": [CHAT[1]]}, ["missing field 'rejected'"]),
    "identical-conversations": ("dpo", {"prompt": [CHAT[0]], "chosen": [CHAT[1]], "rejected": "Four."},
                                ["fields 'chosen' and 'rejected' are identical"]),
    "label-not-boolean": ("kto", {"prompt": [CHAT[0]], "completion": [CHAT[1]], "label": "yes"},
                          ["field 'label' must be true / false (or 1 / 0), got 'yes'"]),
    "kto-missing-completion": ("kto", {"prompt": "2+2?", "label": True}, ["missing field 'completion'"]),
}


@pytest.mark.parametrize("case", ROW_CASES)
def test_conversational_row_mistakes(capsys, tmp_path, chat_model, case):
    method, row, words = ROW_CASES[case]
    source = rows(tmp_path / "rows.jsonl", row)
    train_fails(capsys, tmp_path, [f"model.name={chat_model}", f"method.name={method}", f"data.source={source}",
                                   "data.on_bad_row=stop", "batch_size=1"], *words)


# --- chat templates ---------------------------------------------------------------------------------------

def test_conversations_with_a_tokenizer_that_has_no_template(capsys, tmp_path, plain_model):
    source = rows(tmp_path / "chat.jsonl", {"messages": CHAT})
    train_fails(capsys, tmp_path, [f"model.name={plain_model}", "method.name=sft", f"data.source={source}",
                                   "batch_size=1"],
                "no valid rows", "conversational rows need a chat template", "has none")


def test_chat_template_true_on_a_tokenizer_without_one(capsys, tmp_path, plain_model):
    train_fails(capsys, tmp_path, [f"model.name={plain_model}", "model.chat_template=true"],
                "model.chat_template=true but the tokenizer has no chat template", "model.chat_template=gemma3")


def test_a_chat_template_name_that_is_not_shipped(capsys, tmp_path, chat_model):
    train_fails(capsys, tmp_path, [f"model.name={chat_model}", "model.chat_template=llama9"],
                "model.chat_template='llama9' is neither a shipped template (gemma3, qwen2.5)")


def test_a_chat_template_file_that_cannot_be_read(capsys, tmp_path, chat_model):
    train_fails(capsys, tmp_path, [f"model.name={chat_model}", f"model.chat_template={tmp_path / 'none.jinja'}"],
                "model.chat_template: cannot read", "none.jinja")


# --- rewards, packing, held-out rows, generate --------------------------------------------------------------

def test_a_custom_reward_that_raises_stops_the_run_naming_the_row(capsys, tmp_path, monkeypatch):
    write(tmp_path / "mod" / "broken_reward.py", "def score(prompts, completions, **fields):\n    raise KeyError('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mod"))
    train_fails(capsys, tmp_path, ["method.name=grpo", "reward.name=broken_reward:score"],
                "reward 'broken_reward:score' failed on 4 of 4 completions", "response 0", "raised KeyError")


def test_an_example_longer_than_the_packed_length(capsys, tmp_path):
    train_fails(capsys, tmp_path, ["method.name=sft", "data.source=arithmetic_noisy", "data.answer_field=completion",
                                   "data.packing=true", "data.packed_length=8"],
                "an example of", "tokens is longer than data.packed_length=8")


def test_a_held_out_fraction_that_leaves_nothing_to_train_on(capsys, tmp_path):
    source = rows(tmp_path / "one.jsonl", {"prompt": "1+1=", "answer": "2"})
    train_fails(capsys, tmp_path, [f"data.source={source}", "eval.fraction=0.5", "rollout.prompts_per_step=1"],
                "eval.fraction=0.5 of the 1 rows", "both need at least one row")


def test_generate_an_empty_stop_string(capsys):
    generate_fails(capsys, ["--model", "gemma3-270m", "--prompt", "hi", "--stop", ""], "--stop needs a non-empty text")


def test_generate_chat_on_a_hf_tokenizer_without_a_template(capsys, plain_model):
    generate_fails(capsys, ["--model", str(plain_model), "--prompt", "hi", "--chat"],
                   "--chat: the tokenizer of", "has no chat template", "--no-chat")


def test_reward_fn_that_is_not_a_function(tmp_path):
    from pf_jax.config import ConfigError, load_config
    from pf_jax.config.recipe import TrainConfig
    from pf_jax.training.run import train

    cfg = load_config(TrainConfig, None, ["method.name=grpo", f"logging.runs_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="reward_fn must be a function"):
        train(cfg, reward_fn="my_rewards:score")
