"""Real tokenizers with real chat templates for the conversational tests, all offline.

    gemma_tokenizer()   the embedded Gemma 3 270M's own tokenizer (converted from its GGUF by
                        transformers) with Google's Gemma 3 chat template (the GGUF carries none)
    qwen_tokenizer()    a byte-level BPE trained here on a few sentences, with Qwen2's special tokens
                        (<|endoftext|>, <|im_start|>, <|im_end|>) and Qwen2.5's chat template: the
                        Qwen tokenizer files cannot be downloaded offline, the template is what is tested
    tiny_export(dir, tokenizer)  a tiny random Llama-style model exported with that tokenizer, which
                        `model.name=<dir>` trains
"""

from __future__ import annotations

import functools
from pathlib import Path

from flax import nnx

CORPUS = [
    "You are a helpful assistant. Hello! How are you? I am fine, thank you.",
    "What is two plus two? Two plus two is four. The capital of France is Paris.",
    "Write a haiku about the sea. Waves fold into foam, the tide keeps its slow promise.",
    "system user assistant tool 0123456789 + - * / = ( ) . , ! ? : ; ' \" \n",
]


@functools.cache
def gemma_tokenizer():
    from pf_jax.data.chat_render import named_chat_template
    from pf_jax.models.embedded import embedded_gguf_path, embedded_sha256
    from pf_jax.models.gguf_tokenizer import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(embedded_gguf_path("gemma3-270m"), sha256=embedded_sha256("gemma3-270m"))
    tokenizer.chat_template = named_chat_template("gemma3")
    return tokenizer


@functools.cache
def qwen_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pf_jax.data.chat_render import named_chat_template

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=specials[1:])
    tokenizer.chat_template = named_chat_template("qwen2.5")
    return tokenizer


def tiny_export(directory: Path, tokenizer) -> Path:
    from pf_jax.models.config import ModelConfig
    from pf_jax.models.decoder import Decoder
    from pf_jax.models.hf_io import export_hf_directory

    cfg = ModelConfig.tiny("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=16, bos_token_id=tokenizer.eos_token_id,
                           eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
    export_hf_directory(Decoder(cfg, rngs=nnx.Rngs(0)), directory)
    tokenizer.save_pretrained(str(directory))
    return directory
