"""Agentic RL in the trainer: the sampler-backed turn policy, the env response source, the word codec."""

import jax
import numpy as np
import pytest
from flax import nnx

from pf_jax.config import load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.data.saved_codec import load_codec
from pf_jax.data.sequences import pack_sequences
from pf_jax.envs.maze import MazeEnv
from pf_jax.envs.rollout import RolloutConfig, TurnRequest, build_messages
from pf_jax.envs.sampler_policy import PromptTooLongError, SamplerPolicy, encode_messages, render_plain
from pf_jax.methods.env_rollouts import pack_step_rows
from pf_jax.methods.scoring import response_logprobs
from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder
from pf_jax.rewards.step_advantages import gigpo_advantages, grpo_episode_advantages, rewardflow_advantages
from pf_jax.sampling import sampler as sampler_module
from pf_jax.sampling.sampler import GenerationConfig
from pf_jax.tasks.maze import maze_vocabulary, maze_word_codec, split_words
from pf_jax.training.trainer import Trainer

CODEC = maze_word_codec(maze_vocabulary())


def _tiny_model(seed=0):
    cfg = ModelConfig.tiny("llama", vocab_size=CODEC.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=16, bos_token_id=CODEC.bos_id,
                           eos_token_ids=CODEC.eos_ids, pad_token_id=CODEC.pad_id)
    return Decoder(cfg, rngs=nnx.Rngs(seed))


def _requests(n, history_window=0):
    out = []
    for i in range(n):
        env = MazeEnv()
        obs = env.reset(f"maze-{3 + i % 3}x4", i)
        msgs = build_messages(env.instructions, obs, [], obs, env.admissible_actions,
                              RolloutConfig(history_window=history_window, require_action_tags=False))
        out.append(TurnRequest(i, 0, msgs, obs, env.admissible_actions))
    return out


def test_word_codec_round_trip_unknown_words_and_save(tmp_path):
    text = "You are at row 3, column 12 of a 4x4 maze. Open directions: north, east."
    ids = CODEC.encode(text)
    assert CODEC.unk_id not in ids
    assert CODEC.decode_response(ids) == " ".join(split_words(text))
    assert CODEC.encode("xylophone north") == [CODEC.unk_id, CODEC.encode("north")[0]]
    assert CODEC.encode_response("north")[-1] == CODEC.eos_id
    CODEC.save(tmp_path)
    assert load_codec(tmp_path).words == CODEC.words
    with pytest.raises(ValueError, match="collide"):
        maze_word_codec(["north", "<eos>"])


def test_turn_policy_pads_to_a_fixed_batch_and_logprobs_match_teacher_forcing():
    model = _tiny_model()
    gen = GenerationConfig(max_new_tokens=5, eos_token_ids=CODEC.eos_ids, pad_token_id=CODEC.pad_id,
                           min_prompt_bucket=8)
    key = jax.random.key(3)
    requests = _requests(3)
    policy = SamplerPolicy(model, CODEC, gen, batch_size=4, key=key)
    responses = policy(requests)
    assert len(responses) == 3 and policy.calls == 1
    for req, resp in zip(requests, responses):
        np.testing.assert_array_equal(resp.prompt_tokens, CODEC.encode_prompt(render_plain(req.messages)))
        np.testing.assert_array_equal(resp.prompt_tokens, encode_messages(CODEC, req.messages))
        assert 1 <= resp.tokens.size <= 5 and resp.tokens.shape == resp.logprobs.shape
        assert resp.text == CODEC.decode_response(resp.tokens)
    # the sampler's log-probs are the policy's teacher-forced log-probs of the same tokens
    seq = pack_sequences([r.prompt_tokens.tolist() for r in responses], [r.tokens.tolist() for r in responses],
                         pad_id=CODEC.pad_id)
    logp, _, _ = response_logprobs(model, seq)
    for i, r in enumerate(responses):
        np.testing.assert_allclose(np.asarray(logp[i, : r.tokens.size]), r.logprobs, atol=2e-4)
    # padding rows do not leak into the live rows: row 0 alone (padded with copies) samples the same
    alone = SamplerPolicy(model, CODEC, gen, batch_size=4, key=key)([requests[0]])
    np.testing.assert_array_equal(alone[0].tokens, responses[0].tokens)
    # fewer live episodes, or more than one batch, reuse the compiled program (same batch shape)
    compiled = sampler_module._decode._cache_size()
    more = policy(_requests(6))
    assert len(more) == 6 and policy.calls == 3
    policy(_requests(1))
    assert sampler_module._decode._cache_size() == compiled


def test_turn_policy_rejects_a_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        SamplerPolicy(_tiny_model(), CODEC, GenerationConfig(), batch_size=0, key=jax.random.key(0))


def test_turn_prompt_over_the_limit_is_a_named_error():
    """A prompt is never cut (that would drop the task or the observation): over data.max_prompt_tokens the
    turn names itself and the two settings that bound it."""
    requests = _requests(2, history_window=2)
    longest = max(len(encode_messages(CODEC, r.messages)) for r in requests)
    gen = GenerationConfig(max_new_tokens=2, eos_token_ids=CODEC.eos_ids, pad_token_id=CODEC.pad_id)
    model, key = _tiny_model(), jax.random.key(0)
    assert len(SamplerPolicy(model, CODEC, gen, batch_size=2, key=key, max_prompt_tokens=longest)(requests)) == 2
    with pytest.raises(PromptTooLongError, match=rf"turn 0 of episode \d: the prompt has {longest} tokens, more than "
                                                 rf"data.max_prompt_tokens={longest - 1}; .*env.history_window"):
        SamplerPolicy(model, CODEC, gen, batch_size=2, key=key, max_prompt_tokens=longest - 1)(requests)


TINY_MAZE = [
    "model.name=tiny", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "model.tiny.head_dim=16", "model.tiny.tokenizer=maze-words",
    "rollout.max_new_tokens=3", "eval.enabled=false", "export=false", "optimizer.lr=1e-3", "steps=1",
    "logging.tensorboard=false", "logging.plots=false", "logging.progress_bar=false",
    "env.tasks=[maze-3x3]", "env.task_seeds=2", "env.tasks_per_step=2", "env.group_size=3", "env.max_steps=3",
    "env.min_row_bucket=8",
]


def _trainer(tmp_path, method, *extra):
    cfg = load_config(TrainConfig, None, [*TINY_MAZE, f"method.name={method}", f"logging.runs_dir={tmp_path}",
                                          f"logging.run_name={method}", *extra])
    return Trainer(cfg)


@pytest.mark.parametrize("method,expected", [
    ("rewardflow", lambda eps, env: rewardflow_advantages(eps, env.gamma, env.invalid_penalty, env.step_weight)[0]),
    ("gigpo", lambda eps, env: gigpo_advantages(eps, env.gamma, env.invalid_penalty, env.step_weight)),
    ("grpo_episode", lambda eps, env: grpo_episode_advantages(eps)),
])
def test_batch_rows_are_the_turns_with_the_step_advantages(tmp_path, method, expected):
    trainer = _trainer(tmp_path, method, "env.gamma=0.8", "env.invalid_penalty=0.2", "env.step_weight=0.5")
    assert trainer.reference is not None  # default KL 0.01 (k3) to the initial policy
    rows = trainer.prompts.next_batch()
    batch, metrics = trainer.make_batch(rows, 0)
    episodes = trainer.responses.last_episodes
    steps = [s for e in episodes for s in e.steps]
    S, seq = len(steps), batch.seq
    assert len(episodes) == 2 * 3 and {e.group_id for e in episodes} == {0, 1}
    assert seq.prompt_tokens.shape[0] == max(8, 1 << (S - 1).bit_length())
    want = expected(episodes, trainer.cfg.env)
    mask = np.asarray(seq.response_mask)
    adv = np.asarray(batch.advantages)
    np.testing.assert_allclose(adv, (np.pad(want, (0, mask.shape[0] - S))[:, None] * mask).astype(np.float32),
                               rtol=1e-6)
    assert not mask[S:].any()
    for i, s in enumerate(steps):
        assert mask[i].sum() == s.response_tokens.size
        np.testing.assert_array_equal(np.asarray(seq.response_tokens)[i, : s.response_tokens.size], s.response_tokens)
        real_prompt = np.asarray(seq.prompt_tokens)[i][np.asarray(seq.prompt_mask)[i]]
        np.testing.assert_array_equal(real_prompt, s.prompt_tokens)
    # old_logp = the sampler's log-probs = teacher-forced log-probs under the (not yet updated) policy
    logp = trainer.scorer.logprobs(trainer.state.params["policy"], seq)
    np.testing.assert_allclose(np.where(mask, np.asarray(logp), 0.0), np.asarray(batch.old_logp), atol=2e-4)
    np.testing.assert_allclose(np.asarray(batch.ref_logp), np.asarray(logp), atol=1e-5)
    assert metrics["step_rows"] == S and 0.0 <= metrics["success_rate"] <= 1.0
    out = trainer.update(batch, 0)
    assert np.isfinite(out["loss"]) and out["skipped"] == 0


def test_pack_step_rows_refuses_steps_without_tokens():
    from pf_jax.envs.episodes import Episode, Step

    ep = Episode("maze-3x3", 0, 0, "a", "obs", [Step("a", "obs", "north", "north", 0.0, True, "b", False)])
    with pytest.raises(ValueError, match="no prompt or response tokens"):
        pack_step_rows([ep], 0)


def test_agentic_run_stops_on_a_turn_prompt_over_data_max_prompt_tokens(tmp_path, capsys):
    trainer = _trainer(tmp_path, "rewardflow", "data.max_prompt_tokens=8")
    with pytest.raises(PromptTooLongError, match=r"more than data\.max_prompt_tokens=8"):
        trainer.run()
    from pf_jax.train import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: {name: rewardflow}\n")
    assert main(["--config", str(recipe), *TINY_MAZE, f"logging.runs_dir={tmp_path}", "data.max_prompt_tokens=8"]) == 2
    assert "pf_jax.train: turn 0 of episode 0: the prompt has" in capsys.readouterr().err


def test_agentic_run_trains_and_logs_success(tmp_path):
    trainer = _trainer(tmp_path, "rewardflow", "steps=2", "method.loss={kl_coef: 0.0}", "method.entropy_coef=0.001")
    assert trainer.reference is None
    result = trainer.run()
    assert result.completed and result.final_step == 2
    longest = max(s.prompt_tokens.size for e in trainer.responses.last_episodes for s in e.steps)
    assert result.summary["prompt_tokens_max"]["last"] == longest
    assert "success_rate" in result.summary and np.isfinite(result.summary["loss"]["last"])


def test_chat_template_codec_encodes_the_turn_messages_with_the_template():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pf_jax.data.codec import HFCodec

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<start>", "<end>", "[UNK]", *maze_vocabulary()])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="[UNK]")
    tok.chat_template = ("{% for m in messages %}<start> {{ m['content'] }} <end> {% endfor %}"
                         "{% if add_generation_prompt %}<start>{% endif %}")
    messages = _requests(1)[0].messages
    templated = encode_messages(HFCodec(tok, chat_template=True), messages)
    assert templated == tok(f"<start> {messages[0]['content']} <end> <start>")["input_ids"]
    plain = encode_messages(HFCodec(tok, chat_template=False), messages)
    assert plain == tok(render_plain(messages))["input_ids"] and plain != templated
