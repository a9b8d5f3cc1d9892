"""Conversational rows rendered with real chat templates (Gemma 3's on the embedded model's tokenizer,
Qwen2.5's on a byte-level BPE built here): the prompt is what the sampler is given, the targets are the
assistant turns ending with the template's end-of-turn token, and SFT / DPO / KTO / GRPO train on them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pf_jax.config import load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.data.chat_render import ChatTemplateError, named_chat_template
from pf_jax.data.codec import CharCodec, HFCodec
from pf_jax.data.row_checks import kto_row_check, preference_row_check, prompt_row_check
from pf_jax.data.rows import RowProblem
from tests.chat_fixtures import gemma_tokenizer, qwen_tokenizer, tiny_export

TOKENIZERS = {"gemma3": gemma_tokenizer, "qwen2.5": qwen_tokenizer}
TURN_END = {"gemma3": "<end_of_turn>", "qwen2.5": "<|im_end|>"}
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi. How are you?"},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
]


@pytest.fixture(params=sorted(TOKENIZERS))
def template(request):
    return request.param, TOKENIZERS[request.param]()


def test_the_turn_end_token_ends_responses_and_stops_the_sampler(template):
    name, tokenizer = template
    codec = HFCodec(tokenizer, chat_template=True)
    turn_end = tokenizer.convert_tokens_to_ids(TURN_END[name])
    assert codec.renderer.turn_end_id == turn_end
    assert codec.eos_ids == (tokenizer.eos_token_id, turn_end)
    assert codec.encode_response("Four.")[-1] == turn_end  # not <eos>: the template ends turns otherwise
    assert HFCodec(tokenizer, chat_template=False).encode_response("Four.")[-1] == tokenizer.eos_token_id


def test_multi_turn_with_a_system_prompt_trains_on_the_assistant_turns_only(template):
    name, tokenizer = template
    codec = HFCodec(tokenizer)
    prompt, response, trained = codec.encode_conversation(CHAT[:2], CHAT[2:])
    # the prompt is exactly what generation is given; prompt + response is the template's own rendering
    assert tokenizer.decode(prompt) == tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    whole = tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    assert prompt + response == whole[: len(prompt) + len(response)]
    end = TURN_END[name]
    assert tokenizer.decode([t for t, k in zip(response, trained) if k]) == f"Hi. How are you?{end}Four.{end}"
    untrained = tokenizer.decode([t for t, k in zip(response, trained) if not k])
    assert "What is two plus two?" in untrained and "Hi." not in untrained
    assert response[-1] == tokenizer.convert_tokens_to_ids(end) and trained[-1]
    _, _, every = codec.encode_conversation(CHAT[:2], CHAT[2:], assistant_only=False)
    assert all(every) and len(every) == len(response)


def test_a_conversation_as_a_prompt_opens_the_assistant_turn(template):
    _, tokenizer = template
    ids = HFCodec(tokenizer).encode_prompt(CHAT[:4])
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)


def test_a_conversation_the_template_refuses_names_the_reason():
    codec = HFCodec(gemma_tokenizer())  # Gemma's template wants user / assistant turns in turn
    with pytest.raises(ChatTemplateError, match=r"cannot render this conversation.*alternate"):
        codec.encode_conversation([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                                  [{"role": "assistant", "content": "c"}])


def test_tokenizers_without_a_template_say_what_to_set():
    with pytest.raises(ChatTemplateError, match=r"CharTokenizer tokenizer has none"):
        CharCodec().encode_conversation(CHAT[:2], CHAT[2:])
    with pytest.raises(ChatTemplateError, match="neither a shipped template"):
        named_chat_template("llama9")


def test_row_checks_read_every_conversational_shape():
    sft = prompt_row_check(answer_field="answer", targets_in_messages=True)({"messages": CHAT})
    assert sft == {"prompt": CHAT[:2], "messages": CHAT}
    sampled = prompt_row_check(answer_field="answer")({"messages": CHAT, "answer": "4"})
    assert sampled == {"prompt": CHAT[:4], "answer": "4"}
    chosen, rejected = [*CHAT[:4], {"role": "assistant", "content": "4"}], [*CHAT[:4], {"role": "assistant", "content": "5"}]
    implicit = preference_row_check()({"chosen": chosen, "rejected": rejected})
    assert implicit == {"prompt": CHAT[:4], "chosen": chosen[4:], "rejected": rejected[4:]}
    explicit = preference_row_check()({"prompt": "2+2?", "chosen": [chosen[4]], "rejected": "5"})
    assert explicit == {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [chosen[4]],
                        "rejected": [{"role": "assistant", "content": "5"}]}
    kto = kto_row_check()({"prompt": CHAT[:2], "completion": [CHAT[2]], "label": 1})
    assert kto == {"prompt": CHAT[:2], "completion": [CHAT[2]], "label": True}
    assert isinstance(prompt_row_check(targets_in_messages=True)({"messages": CHAT[:2]}), RowProblem)


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _trainer(tmp_path, model_dir, method, source, *extra):
    from pf_jax.training.trainer import Trainer

    cfg = load_config(TrainConfig, None, [
        f"model.name={model_dir}", f"method.name={method}", f"data.source={source}", "batch_size=4", "steps=1",
        "eval.enabled=false", "export=false", "logging.tensorboard=false", "logging.plots=false",
        "logging.progress_bar=false", f"logging.runs_dir={tmp_path}", "optimizer.lr=1e-3", *extra])
    return Trainer(cfg)


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("qwen_tiny"), qwen_tokenizer())


def test_sft_loss_is_the_mean_over_assistant_tokens(tmp_path, qwen_model):
    """The trainer's loss on a batch of conversations equals the mean negative log-likelihood of the
    assistant turns' tokens, computed here from the codec's own encoding and the model's logits."""
    from pf_jax.methods.scoring import response_logprobs

    rows = [{"messages": CHAT}, {"messages": CHAT[1:3]}, {"messages": [*CHAT[:4], {"role": "assistant", "content": "4"}]},
            {"messages": CHAT[3:]}]
    trainer = _trainer(tmp_path, qwen_model, "sft", _rows(tmp_path / "chat.jsonl", rows), "data.shuffle=false")
    batch, _ = trainer.make_batch(trainer.prompts.next_batch(), 0)
    seq = batch.seq
    assert seq.target_mask is not None and int(seq.loss_mask.sum()) < int(seq.response_mask.sum())
    model = jax.tree_util.tree_map(lambda x: x, trainer.modules()["policy"])
    logp, _, _ = response_logprobs(model, seq)
    expected = -float(jnp.sum(jnp.where(seq.loss_mask, logp, 0.0)) / seq.loss_mask.sum())
    loss, _ = trainer.objective.loss(trainer.modules(), batch)
    assert abs(float(loss) - expected) < 1e-5


@pytest.mark.parametrize(("method", "rows"), [
    ("dpo", [{"chosen": [*CHAT[:4], {"role": "assistant", "content": "Four."}],
              "rejected": [*CHAT[:4], {"role": "assistant", "content": "Five."}]}] * 4),
    ("kto", [{"prompt": CHAT[:4], "completion": [{"role": "assistant", "content": a}], "label": a == "Four."}
             for a in ("Four.", "Five.", "Four.", "Three.")]),
])
def test_preference_methods_train_on_conversations(tmp_path, qwen_model, method, rows):
    trainer = _trainer(tmp_path, qwen_model, method, _rows(tmp_path / "rows.jsonl", rows))
    before = jax.tree_util.tree_map(np.asarray, trainer.state.params["policy"])
    result = trainer.run()
    assert result.completed
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), trainer.state.params["policy"],
                                   before)
    assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_sampled_prompts_from_conversations(tmp_path, qwen_model):
    rows = [{"messages": CHAT[:4], "answer": "4"}] * 4
    trainer = _trainer(tmp_path, qwen_model, "grpo", _rows(tmp_path / "p.jsonl", rows), "reward.name=entropy",
                       "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=4")
    batch, _ = trainer.make_batch(trainer.prompts.next_batch(), 0)
    prompt = np.asarray(batch.seq.prompt_tokens[0])[np.asarray(batch.seq.prompt_mask[0])]
    tokenizer = qwen_tokenizer()
    assert tokenizer.decode(prompt) == tokenizer.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)


def test_a_conversation_without_a_target_is_a_bad_row_found_when_the_data_loads(tmp_path, qwen_model, capsys):
    from pf_jax.data.rows import BadRowError

    rows = [{"messages": CHAT}, {"messages": [{"role": "user", "content": "no answer"}]}]
    with pytest.raises(BadRowError, match=r"bad row 1 .*no assistant message"):
        _trainer(tmp_path, qwen_model, "sft", _rows(tmp_path / "bad.jsonl", rows), "data.on_bad_row=stop", "batch_size=1")


def test_a_conversation_the_template_refuses_is_a_bad_row_not_a_failed_run():
    from pf_jax.config import DataConfig
    from pf_jax.data.examples import sft_example
    from pf_jax.data.loading import validated_prompt_rows

    codec = HFCodec(gemma_tokenizer())
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    out = validated_prompt_rows([{"messages": CHAT}, {"messages": twice}], DataConfig(source="x.jsonl"),
                                targets_in_messages=True, render=lambda row: sft_example(codec, row, "answer"))
    assert len(out.rows) == 1 and out.report.skipped_by_kind["template error"] == 1
    assert "must alternate" in out.report.examples[0][1]
