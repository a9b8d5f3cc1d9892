"""SFT packing (data.packing): examples packed end to end in a row, with segment-aware attention and
positions, give the same per-token log-probs, loss and gradients as one example per row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pf_jax.config import ConfigError
from pf_jax.data.examples import Example, layout
from pf_jax.data.packing import assign_rows, pack_examples
from pf_jax.losses import supervised
from pf_jax.methods.batches import SupervisedBatch
from pf_jax.methods.supervised import Supervised
from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder


def _examples(seed: int, n: int = 7, vocab: int = 50) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, r = int(rng.integers(1, 6)), int(rng.integers(1, 9))
        trained = None if i % 2 else [bool(x) for x in rng.integers(0, 2, r)]  # some conversations: part trained
        out.append(Example(rng.integers(3, vocab, p).tolist(), rng.integers(3, vocab, r).tolist(), trained))
    return out


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_packed_rows_give_the_loss_and_gradients_of_one_example_per_row(architecture):
    cfg = ModelConfig.tiny(architecture, vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=16, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    examples = _examples(1)
    objective = Supervised(lambda **kw: supervised.nll_loss(aggregation="token_mean", **kw), False, chunk_size=8)
    one_per_row, packed = layout(examples, pad_id=0), pack_examples(examples, length=24, pad_id=0)
    assert packed.tokens.shape[0] < one_per_row.tokens.shape[0]

    def loss(p, seq):
        return objective.loss({"policy": nnx.merge(graphdef, p)}, SupervisedBatch(seq))[0]

    (a, ga), (b, gb) = (jax.value_and_grad(loss)(params, s) for s in (one_per_row, packed))
    assert abs(float(a) - float(b)) < 1e-5
    diff = jax.tree_util.tree_map(lambda x, y: float(jnp.max(jnp.abs(x - y))), ga, gb)
    assert max(jax.tree_util.tree_leaves(diff)) < 1e-5


def test_packing_without_segments_would_differ():
    """The equivalence is not free: the same packed tokens attending across examples change the loss."""
    cfg = ModelConfig.tiny("llama", vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           num_kv_heads=1, head_dim=16, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    packed = pack_examples(_examples(2), length=24, pad_id=0)
    leaky = packed.replace(segment_ids=None, segment_positions=None)
    objective = Supervised(lambda **kw: supervised.nll_loss(aggregation="token_mean", **kw), False, chunk_size=8)
    a = objective.loss({"policy": model}, SupervisedBatch(packed))[0]
    b = objective.loss({"policy": model}, SupervisedBatch(leaky))[0]
    assert abs(float(a) - float(b)) > 1e-4


def test_rows_are_filled_first_fit_and_an_example_too_long_is_named():
    rows = assign_rows([5, 3, 8, 2, 6], length=10)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 8, 2, 6][i] for i in row) <= 10 for row in rows) and len(rows) == 3
    with pytest.raises(ConfigError, match=r"an example of 11 tokens is longer than data\.packed_length=10"):
        assign_rows([11], length=10)


def test_the_trainer_packs_sft_rows(tmp_path):
    from pf_jax.config import load_config
    from pf_jax.config.recipe import TrainConfig
    from pf_jax.training.trainer import Trainer
    from tests.test_trainer_methods import TINY

    cfg = load_config(TrainConfig, None, [*TINY, "method.name=sft", "data.source=arithmetic_noisy",
                                          "data.answer_field=completion", "data.packing=true", "data.packed_length=32",
                                          f"logging.runs_dir={tmp_path}"])
    trainer = Trainer(cfg)
    batch, _ = trainer.make_batch(trainer.prompts.next_batch(), 0)
    assert batch.seq.segment_ids is not None and batch.seq.tokens.shape == (4, 32)  # 8 rows of ~10 tokens: 3 packed + 1 empty
    assert int(batch.seq.segment_ids.max()) == 3
    assert trainer.run().completed
