"""Where a recipe's policy comes from: a tiny model from scratch, the built-in arithmetic base model, an
exported directory, the embedded Gemma 3 270M, a GGUF file or a hub name."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from pf_jax.config import ConfigError
from pf_jax.config.recipe import CONFIGS_DIR, LoraSection, ModelSection
from pf_jax.data.codec import CharCodec, HFCodec, TextCodec
from pf_jax.data.saved_codec import load_codec
from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder, with_layer_layout
from pf_jax.models.hf_io import load_hf_directory
from pf_jax.models.lora import LoraSpec, add_adapters
from pf_jax.models.ops import select_ops
from pf_jax.models.peft_io import load_peft_adapter
from pf_jax.models.quantized import QuantSpec, quantize_base
from pf_jax.tasks.maze import maze_vocabulary, maze_word_codec

ARITH_BASE = "arith-base"
ARITH_BASE_RECIPE = CONFIGS_DIR / "arith" / "base.yaml"
MAZE_BASE = "maze-base"
MAZE_BASE_RECIPE = CONFIGS_DIR / "rewardflow" / "maze_base.yaml"


# Built-in base models: each is an ordinary trainer run of its recipe, built before a run that names it
# (pf_jax.training.bases). name -> (recipe, what it is, for the message printed while it is built).
BUILT_IN_BASES = {
    ARITH_BASE: (ARITH_BASE_RECIPE, "arithmetic base model"),
    MAZE_BASE: (MAZE_BASE_RECIPE, "maze warm-start policy"),
}


def built_in_base_directory(name: str, runs_dir: str | Path) -> Path:
    """Where the built-in base model `name` is exported."""
    return Path(runs_dir) / name / "export"


def _dtype(name: str) -> jnp.dtype:
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def _instruction_word_codec() -> TextCodec:
    from pf_jax.data.word_codec import WordCodec, WordTokenizer
    from pf_jax.tasks.instructions.rows import instruction_vocabulary_texts

    return WordCodec(WordTokenizer.from_texts(instruction_vocabulary_texts()))


def tiny_codec(tokenizer: str) -> TextCodec:
    """The codec of a from-scratch model's `model.tiny.tokenizer` (char, words or maze-words)."""
    codecs = {"char": CharCodec, "words": _instruction_word_codec,
              "maze-words": lambda: maze_word_codec(maze_vocabulary())}
    return codecs[tokenizer]()


def tiny_model_config(cfg: ModelSection) -> tuple[ModelConfig, TextCodec]:
    """The architecture `model.tiny` describes, with the vocabulary and special ids of its codec."""
    t = cfg.tiny
    codec = tiny_codec(t.tokenizer)
    config = ModelConfig.tiny(
        t.architecture, vocab_size=codec.vocab_size, hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size, num_layers=t.num_layers, num_heads=t.num_heads,
        num_kv_heads=t.num_kv_heads, head_dim=t.head_dim, bos_token_id=codec.bos_id,
        eos_token_ids=codec.eos_ids, pad_token_id=codec.pad_id,
    )
    return config, codec


def load_policy(cfg: ModelSection, *, runs_dir: str | Path) -> tuple[Decoder, TextCodec]:
    """The policy Decoder and the codec for its tokenizer, as named by `model.name`."""
    dtype, param_dtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    name = cfg.name
    if name == "tiny":
        config, codec = tiny_model_config(cfg)
        model = Decoder(config, rngs=nnx.Rngs(cfg.tiny.init_seed), dtype=dtype, param_dtype=param_dtype,
                        remat=cfg.remat, ops=select_ops(jax.default_backend()))
        if not cfg.scan_layers:  # initialised stacked, so both layouts start from the same values
            model = with_layer_layout(model, scan_layers=False)
        return (model if cfg.lora is None else with_adapters(model, cfg.lora)), codec
    if name in BUILT_IN_BASES:
        name = str(built_in_base_directory(name, runs_dir))
        if not (Path(name) / "config.json").is_file():
            raise ConfigError(f"model.name={cfg.name!r}: the built-in base model is not built in {name} yet; "
                              f"pf_jax.train builds it first (or: python -m pf_jax.train --config "
                              f"{BUILT_IN_BASES[cfg.name][0]} logging.runs_dir={runs_dir})")
    path = Path(name)
    if path.is_dir():
        model = load_hf_directory(path, dtype=dtype, param_dtype=param_dtype, scan_layers=cfg.scan_layers)
        codec = load_codec(path, chat_template=cfg.chat_template, eos_ids=model.cfg.eos_token_ids)
    else:
        from pf_jax.models.registry import load_model

        model, tokenizer = load_model(name, dtype=dtype, param_dtype=param_dtype, scan_layers=cfg.scan_layers)
        codec = HFCodec(tokenizer, chat_template=cfg.chat_template, eos_ids=model.cfg.eos_token_ids)
    model.remat = cfg.remat  # rematerialise each layer in the backward pass (a static attribute of the graph)
    model.ops = select_ops(jax.default_backend())  # splash attention on TPU, cuDNN on GPU, einsums on CPU
    if cfg.lora is not None:
        with_adapters(model, cfg.lora)
    return model, codec


def base_model_name(cfg: ModelSection, runs_dir: str | Path = "runs") -> str:
    """What a PEFT adapter's base_model_name_or_path names: the base's HF directory (absolute) when it is
    one, else its hub name or embedded alias as the recipe gives it."""
    name = str(built_in_base_directory(cfg.name, runs_dir)) if cfg.name in BUILT_IN_BASES else cfg.name
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def with_adapters(model: Decoder, lora: LoraSection) -> Decoder:
    """`model` made a LoRA policy, in place: its base quantised first when lora.quantize is set (QLoRA),
    then fresh adapters, or those of the PEFT directory lora.init_from."""
    if lora.quantize is not None:
        quantize_base(model, QuantSpec(lora.quantize, lora.group_size))
    if lora.init_from is not None:
        return load_peft_adapter(model, lora.init_from, dropout=lora.dropout)
    spec = LoraSpec(lora.rank, lora.alpha, lora.dropout, LoraSpec.resolve_targets(lora.targets), lora.init)
    add_adapters(model, spec, rngs=nnx.Rngs(0), dtype=model.param_dtype)
    return model
