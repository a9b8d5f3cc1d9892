"""Stop strings matched on decoded text across token boundaries (rollout.stop, generate --stop): the
response is cut after the token that completes the first stop string, its mask and log-probs after it
cleared, its finish reason "stop", its text ending with the stop string."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from pf_jax.config.recipe import RolloutSection
from pf_jax.data.codec import CharCodec, HFCodec
from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder
from pf_jax.sampling.sampler import GenerationConfig, generate
from pf_jax.sampling.stops import cut_at_stops, stop_position, stop_token_sequences, unescape
from pf_jax.sampling.texts import generation_config, sample_responses
from tests.chat_fixtures import qwen_tokenizer
from tests.test_sampling_cli import model_dir, run_cli  # noqa: F401 - the CLI's tiny model fixture


def _tiny(codec):
    cfg = ModelConfig.tiny("llama", vocab_size=codec.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=16, bos_token_id=codec.bos_id,
                           eos_token_ids=codec.eos_ids, pad_token_id=codec.pad_id)
    return Decoder(cfg, rngs=nnx.Rngs(3), scan_layers=False)


def test_a_stop_spanning_several_bpe_tokens_is_found_and_the_text_ends_with_it():
    tokenizer = qwen_tokenizer()
    ids = tokenizer("Four.</answer> and more text", add_special_tokens=False)["input_ids"]
    decode = lambda t: tokenizer.decode(list(t))
    keep, text = stop_position(ids, decode, ["</answer>", "\n\n"])
    assert text == "Four.</answer>"
    assert "</answer>" in decode(ids[:keep]) and "</answer>" not in decode(ids[: keep - 1])
    assert len(tokenizer("</answer>", add_special_tokens=False)["input_ids"]) > 1  # it is a multi-token stop
    assert stop_position(ids, decode, ["\n\n"]) is None
    assert unescape(r"a\n\nb\t\\n") == "a\n\nb\t\\n"


def test_stop_strings_become_the_loops_token_sequences():
    """The sampler's loop ends rows on each stop string's own encoding, without the response encoder's
    EOS; rollouts pass them to it."""
    codec = CharCodec()
    seqs = stop_token_sequences(["12", "\n\n"], codec.encode_response, codec.decode_response)
    assert sorted(codec.decode_response(s) for s in seqs) == ["\n\n", "12"] and all(len(s) == 2 for s in seqs)
    hf = HFCodec(qwen_tokenizer())
    answer = stop_token_sequences(["</answer>"], hf.encode_response, hf.decode_response)
    own = tuple(hf.tokenizer("</answer>", add_special_tokens=False)["input_ids"])
    assert own in answer and len(own) > 1 and all(hf.decode_response(s) == "</answer>" for s in answer)
    assert generation_config(RolloutSection(max_new_tokens=8, stop=["</answer>"]), hf).stop_sequences == answer


def test_generated_rows_are_cut_after_the_completing_token():
    codec = CharCodec()
    model = _tiny(codec)
    gen = GenerationConfig(max_new_tokens=16, eos_token_ids=(), pad_token_id=codec.pad_id)
    full = generate(model, [codec.encode_prompt("12+34=")] * 3, jax.random.key(0), gen)
    texts = [codec.decode_response(t) for t in full.response_token_lists()]
    stop = texts[0][3:5]  # two characters: two tokens of the char codec
    cut, cut_texts = cut_at_stops(full, codec.decode_response, [stop], codec.pad_id)
    for row, text in enumerate(texts):
        n = int(cut.lengths[row])
        kept = np.asarray(cut.tokens[row, :n]).tolist()
        if stop not in text:
            assert n == 16 and cut_texts[row] == text
            continue
        # cut right after the token that completes the stop (special tokens decode to nothing)
        assert stop in codec.decode_response(kept) and stop not in codec.decode_response(kept[:-1])
        assert cut_texts[row] == text[: text.find(stop) + len(stop)] and cut.finish_reasons[row] == "stop"
        np.testing.assert_array_equal(np.asarray(cut.tokens[row, :n]), np.asarray(full.tokens[row, :n]))
        assert not np.asarray(cut.response_mask[row, n:]).any()
        assert not np.asarray(cut.policy_logprobs[row, n:]).any()
    assert int(cut.lengths[0]) < 16


def test_rollouts_stop_at_rollout_stop():
    codec = CharCodec()
    rollout = RolloutSection(max_new_tokens=16, stop=["1", "2"])
    seq, _, texts, _ = sample_responses(_tiny(codec), codec, ["12+34="] * 4, 4, jax.random.key(1),
                                           generation_config(rollout, codec))
    for text, response, mask in zip(texts, np.asarray(seq.response_tokens), np.asarray(seq.response_mask)):
        first = min((i for i in (text.find("1"), text.find("2")) if i >= 0), default=None)
        assert first is None or first == len(text) - 1  # nothing after the first stop
        assert codec.decode_response(response[mask]) == text and not mask[mask.sum():].any()
    assert any(t.endswith(("1", "2")) for t in texts)


def test_hf_codec_texts_are_cut_too():
    codec = HFCodec(qwen_tokenizer())
    gen = generation_config(RolloutSection(max_new_tokens=12, stop=["e"]), codec)
    _, _, texts, _ = sample_responses(_tiny_hf(codec), codec, ["Hello"], 4, jax.random.key(2), gen)
    assert all("e" not in t[:-1] for t in texts)


def _tiny_hf(codec):
    cfg = ModelConfig.tiny("llama", vocab_size=codec.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=16, bos_token_id=0, eos_token_ids=codec.eos_ids,
                           pad_token_id=codec.pad_id)
    return Decoder(cfg, rngs=nnx.Rngs(4), scan_layers=False)


def test_generate_cli_stop(model_dir):  # noqa: F811
    base = ["--model", str(model_dir), "--prompt", "w1 w2", "--no-chat", "--temperature", "0", "--max-new-tokens", "12",
            "--json"]
    free = json.loads(run_cli(*base).stdout)["samples"][0]
    words = free["text"].split()
    stop = " ".join(words[2:4])  # two words: two tokens of the word-level tokenizer
    proc = run_cli(*base, "--stop", stop)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    cut = out["samples"][0]
    assert cut["text"].endswith(stop) and cut["finish_reason"] == "stop"
    assert [free["tokens"][2:4]] == out["config"]["stop_sequences"]  # the decode loop ends the row on them
    assert cut["tokens"] == free["tokens"][: len(cut["tokens"])] and len(cut["tokens"]) < len(free["tokens"])


def test_rollout_min_new_tokens_keeps_eos_out_until_then():
    """rollout.min_new_tokens: EOS is not sampled before that many tokens (fixed-length rollouts); a
    minimum above max_new_tokens is a config error naming both."""
    codec = CharCodec()
    cfg = ModelConfig.tiny("llama", vocab_size=codec.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=16, bos_token_id=codec.bos_id,
                           eos_token_ids=codec.eos_ids, pad_token_id=codec.pad_id)
    model = Decoder(cfg, rngs=nnx.Rngs(3), scan_layers=False)
    head = model.embed if cfg.tie_embeddings else model.lm_head_weight
    head.value = head.value.at[codec.eos_ids[0]].multiply(40.0)  # EOS likely

    def lengths(minimum):
        gen = generation_config(RolloutSection(max_new_tokens=12, min_new_tokens=minimum), codec)
        seq, _, _, _ = sample_responses(model, codec, ["12+34="] * 8, 2, jax.random.key(5), gen)
        return np.asarray(seq.response_mask).sum(-1)

    assert lengths(0).min() < 12
    assert (lengths(12) == 12).all() and (lengths(7) >= 7).all()
    with pytest.raises(ValueError, match=r"min_new_tokens=13 exceeds rollout\.max_new_tokens=12"):
        RolloutSection(max_new_tokens=12, min_new_tokens=13)
