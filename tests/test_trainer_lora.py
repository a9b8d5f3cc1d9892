"""LoRA through the one trainer (model.lora): every method trains only its adapters (and heads) over a
frozen base that is also its reference, the step carries no base gradient or moments, the sampler's
log-probs are the adapters' teacher-forced ones, a resume is bit-identical and refuses another base, the
PEFT adapter it exports continues a run, and QLoRA learns like LoRA."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pf_jax.config import ConfigError, load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.methods.registry import METHODS
from pf_jax.models.lora import LoraParam
from pf_jax.training.checkpoint import CheckpointMismatchError
from pf_jax.training.trainer import Trainer
from tests.test_trainer_methods import RECIPES, TINY

LORA = ["model.lora.rank=2", "model.lora.alpha=4"]


def _trainer(tmp_path, method, *extra):
    cfg = load_config(TrainConfig, None, [*TINY, f"method.name={method}", f"logging.runs_dir={tmp_path}",
                                          f"logging.run_name={method}", *LORA, *RECIPES[method], *extra])
    return Trainer(cfg)


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def _differs(a, b) -> bool:
    return any(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: bool(np.any(x != np.asarray(y))), a, b)))


def _names(state) -> list[str]:
    return ["/".join(map(str, path)) for path, _ in nnx.to_flat_state(state)]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_only_its_adapters(tmp_path, method):
    trainer = _trainer(tmp_path, method)
    assert all("_lora_" in name for name in _names(trainer.state.params["policy"]))
    if trainer.composition.reference:  # the base itself: no second copy of the model
        assert trainer.reference is trainer.frozen["policy"]
    base, adapters = _host(trainer.frozen["policy"]), _host(trainer.state.params["policy"])
    result = trainer.run()
    assert result.completed and math.isfinite(result.summary["loss"]["last"])
    assert not _differs(base, trainer.frozen["policy"])
    kept = result.summary.get("kept_fraction", {}).get("max", 1.0)
    assert _differs(adapters, trainer.state.params["policy"]) == (kept != 0), method


def test_the_step_carries_no_base_gradient_or_moments(tmp_path):
    wide = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=256", "model.tiny.num_layers=2"]
    full = _trainer(tmp_path / "full", "sft", *wide, "model.lora=null")
    lora = _trainer(tmp_path / "lora", "sft", *wide)
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
    base, adapters = nbytes(lora.frozen["policy"]), nbytes(lora.state.params["policy"])
    assert adapters < 0.2 * base
    assert nbytes(lora.state.opt_state) <= 2 * adapters + 64  # Adam's moments of the adapters only

    def argument_bytes(trainer):
        batch, _ = trainer.make_batch(trainer.prompts.next_batch(), 0)
        compiled = trainer.train_step.lower(trainer.state, batch, trainer.frozen).compile()
        return compiled.memory_analysis().argument_size_in_bytes

    # full: parameters + 2 moments of them; LoRA: the frozen base once + the adapters and their moments
    assert argument_bytes(full) - argument_bytes(lora) >= 2 * base - 3 * adapters - 1024


@pytest.mark.parametrize("sampler", ["merge", "apply"])
def test_sampled_log_probs_are_the_adapters_teacher_forced_ones(tmp_path, sampler):
    trainer = _trainer(tmp_path, "grpo", f"model.lora.sampler={sampler}")
    rng = np.random.default_rng(0)
    adapters = jax.tree_util.tree_map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32),
                                      trainer.state.params["policy"])
    trainer.state = trainer.state.replace(params={**trainer.state.params, "policy": adapters})
    batch, _ = trainer.make_batch(trainer.prompts.next_batch(), 0)
    forced = trainer.scorer.logprobs(trainer.policy_params(), batch.seq)
    mask = np.asarray(batch.seq.response_mask)
    np.testing.assert_allclose(np.asarray(forced)[mask], np.asarray(batch.old_logp)[mask], atol=2e-5)
    base = trainer.scorer.logprobs(trainer.reference, batch.seq, trainer.base_graphdef)
    assert np.max(np.abs(np.asarray(base)[mask] - np.asarray(forced)[mask])) > 1e-3  # the adapters matter


def test_resume_is_bit_identical_and_refuses_another_base(tmp_path, monkeypatch):
    extra = ["steps=4", "checkpoint.every_steps=2", "checkpoint.async_save=false", "model.lora.dropout=0.1"]
    whole = _trainer(tmp_path / "whole", "grpo", *extra)
    whole.run()
    interrupted = _trainer(tmp_path / "cut", "grpo", *extra)
    real = interrupted.train_one_step

    def stop_at_3(step):
        if step == 2:
            raise KeyboardInterrupt
        return real(step)

    monkeypatch.setattr(interrupted, "train_one_step", stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    resumed = _trainer(tmp_path / "cut", "grpo", *extra)
    resumed.run()
    assert not _differs(_host(whole.state.params), resumed.state.params)
    other = _trainer(tmp_path / "cut", "grpo", *extra[1:], "steps=6", "model.tiny.init_seed=1")
    with pytest.raises(CheckpointMismatchError, match="trained on another base model"):
        other.run()


def test_an_exported_peft_adapter_continues_a_run(tmp_path):
    first = _trainer(tmp_path, "sft", "export=true", "model.lora.targets=[q_proj,v_proj,down_proj]")
    result = first.run()
    adapter = result.export_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (result.export_dir / "model.safetensors").is_file()
    again = _trainer(tmp_path, "sft", f"model.lora.init_from={adapter}", "logging.run_name=again")
    assert sorted(_names(again.state.params["policy"])) == sorted(_names(first.state.params["policy"]))
    assert not _differs(_host(first.state.params["policy"]), again.state.params["policy"])


def test_qlora_learns_like_lora(tmp_path):
    def final_loss(*extra):
        cfg = ["steps=40", "optimizer.lr=1e-2", "model.lora.rank=8", "model.lora.alpha=16",
               "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", *extra]
        trainer = _trainer(tmp_path, "sft", *cfg, f"logging.run_name=q{len(extra)}")
        summary = trainer.run().summary["loss"]
        return summary["first"], summary["last"]

    first, lora = final_loss()
    _, qlora = final_loss("model.lora.quantize=nf4", "model.lora.group_size=16")
    assert lora < first - 0.3, (first, lora)  # LoRA learns on this base
    assert abs(qlora - lora) < 0.1 * (first - lora), (first, lora, qlora)  # and QLoRA as much, within 10%


@pytest.mark.parametrize(("extra", "words"), [
    (["model.lora.targets=[query]"], "match no projection; known: q_proj"),
    (["method.name=reward_model", "reward_model.freeze_backbone=true"], "freeze_backbone=true freezes"),
    (["model.lora.quantize=int8", "mesh.data=2"], "quantised base on a mesh"),
])
def test_lora_options_it_cannot_serve_are_config_errors(tmp_path, extra, words):
    from pf_jax.methods.compose import load_recipe

    with pytest.raises(ConfigError, match=words):
        load_recipe(None, [*TINY, "method.name=sft", "data.source=arithmetic_noisy", *LORA, *extra,
                           f"logging.runs_dir={tmp_path}"])


def test_only_lora_params_are_trained_in_the_graph(tmp_path):
    trainer = _trainer(tmp_path, "sft")
    model = nnx.merge(trainer.graphdefs["policy"], trainer.policy_params())
    assert any(isinstance(v, LoraParam) for _, v in nnx.iter_graph(model))
    plain = nnx.merge(trainer.base_graphdef, trainer.frozen["policy"])
    assert plain.lora is None


def test_generate_samples_with_a_peft_adapter(tmp_path, capsys):
    """python -m pf_jax.generate --model BASE --adapter DIR decodes the adapters' model: greedy tokens and
    log-probs of the base with the adapter, not of the base alone."""
    import json

    from pf_jax.data.codec import CharCodec
    from pf_jax.generate import main
    from pf_jax.models.config import ModelConfig
    from pf_jax.models.decoder import Decoder
    from pf_jax.models.hf_io import export_hf_directory, load_hf_directory
    from pf_jax.models.lora import LoraSpec, add_adapters
    from pf_jax.models.peft_io import save_peft_adapter

    codec = CharCodec()
    cfg = ModelConfig.tiny("qwen2", vocab_size=codec.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=16, bos_token_id=codec.bos_id,
                           eos_token_ids=codec.eos_ids, pad_token_id=codec.pad_id)
    export_hf_directory(Decoder(cfg, rngs=nnx.Rngs(0)), tmp_path / "base")
    codec.save(tmp_path / "base")
    adapted = load_hf_directory(tmp_path / "base")
    add_adapters(adapted, LoraSpec(rank=4, alpha=8), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(2)
    for _, var in nnx.iter_graph(adapted):
        if isinstance(var, LoraParam):
            var.set_value(var[...] + rng.normal(size=var.shape).astype(np.float32))
    save_peft_adapter(adapted, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))

    def greedy(*extra):
        assert main(["--model", str(tmp_path / "base"), *extra, "--prompt", "12+3=", "--temperature", "0",
                     "--max-new-tokens", "6", "--json"]) == 0
        sample = json.loads(capsys.readouterr().out)["samples"][0]
        return sample["tokens"], sample["policy_logprobs"]

    tokens, logp = greedy("--adapter", str(tmp_path / "adapter"))
    prompt = codec.encode_prompt("12+3=")
    seq = np.asarray([prompt + tokens])
    hidden, _ = adapted(jnp.asarray(seq), jnp.arange(seq.shape[1])[None])
    want = jax.nn.log_softmax(adapted.logits(hidden)[0, len(prompt) - 1 : -1], -1)
    np.testing.assert_allclose(logp, np.asarray(want)[np.arange(len(tokens)), tokens], atol=2e-5)
    assert np.all(np.asarray(want).argmax(-1) == tokens)  # greedy under the adapted model
    assert greedy() != (tokens, logp)
