"""LoRA adapters on the decoder's projections (Hu et al. 2021, arXiv 2106.09685), PEFT's conventions:

    y = x W + (alpha / r) * dropout(x) A B,      A [in, r] Gaussian or Kaiming-uniform, B [r, out] = 0

so a model with fresh adapters computes exactly the base model. The adapters are `LoraParam` variables
(an nnx.Param subclass) on the stacked DecoderLayers beside the projection they adapt, with the same
leading layers axis, so `nnx.split(model, LoraParam, nnx.Param)` separates the trainable adapters from the
frozen base, and the layer scan slices both alike. Targets are named as in HF / PEFT (q_proj ... down_proj,
or all-linear); embed_tokens adapts the input embedding (an embedding lookup of A, then B).

Why not qwix's LoRA: qwix adds adapters by intercepting a module's einsum whose right operand *is* one of
its parameters. This decoder's projections run on per-layer slices of stacked weights inside lax.scan,
cast to the compute dtype first, so no einsum operand is a parameter: qwix.apply_lora_to_model creates no
adapter on it (measured: 0 LoRA parameters, tests/test_lora.py). QLoRA's quantised base does use qwix's
quantised arrays (pf_jax.models.quantized).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from pf_jax.models.errors import ModelInputError
from pf_jax.models.quantized import compute_array

# HF / PEFT module name -> (our DecoderLayers weight, its input dims after the layers axis)
PROJECTIONS: dict[str, tuple[str, int]] = {
    "q_proj": ("q", 1), "k_proj": ("k", 1), "v_proj": ("v", 1), "o_proj": ("o", 2),
    "gate_proj": ("gate", 1), "up_proj": ("up", 1), "down_proj": ("down", 1),
}
EMBEDDING = "embed_tokens"
KNOWN_TARGETS = (*PROJECTIONS, EMBEDDING, "all-linear")


class LoraParam(nnx.Param):
    """A LoRA adapter matrix: trained while the base parameters (plain nnx.Param) stay frozen."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """rank r, alpha (scale alpha / r), dropout on the adapter's input while training, the adapted targets
    (HF names), A's initialisation ("gaussian": N(0, 1/r) as PEFT's init_lora_weights="gaussian";
    "kaiming": Kaiming-uniform, PEFT's default)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(PROJECTIONS)
    init: str = "gaussian"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ModelInputError(f"LoRA rank must be >= 1, got {self.rank}")
        unknown = [t for t in self.targets if t not in PROJECTIONS and t != EMBEDDING]
        if unknown:
            raise ModelInputError(f"LoRA target(s) {unknown} match no projection; known: {', '.join(KNOWN_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def projections(self) -> tuple[str, ...]:
        """Our weight names of the adapted projections (q, k, ...)."""
        return tuple(PROJECTIONS[t][0] for t in self.targets if t in PROJECTIONS)

    @staticmethod
    def resolve_targets(names: Sequence[str]) -> tuple[str, ...]:
        """HF names with "all-linear" expanded to every projection (PEFT's meaning: not the head)."""
        out: list[str] = []
        for name in names:
            for target in (PROJECTIONS if name == "all-linear" else (name,)):
                if target not in out:
                    out.append(target)
        return tuple(out)


def _init_a(spec: LoraSpec, key: Array, shape: tuple[int, ...], fan_in: int, dtype: jnp.dtype) -> Array:
    if spec.init == "kaiming":  # torch's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return (jax.random.normal(key, shape) / spec.rank).astype(dtype)


def _adapter(value: Array, names: tuple[str | None, ...]) -> LoraParam:
    return LoraParam(value, out_sharding=names, eager_sharding=False)


def add_adapters(model: nnx.Module, spec: LoraSpec, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32) -> None:
    """Give `model` (a Decoder, scanned or unrolled layers) fresh adapters for spec's targets, in place."""
    layers = [model.layers] if model.scan_layers else list(model.layers)
    for layer in layers:
        for name in spec.projections:
            var = getattr(layer, name)
            w = var.get_value()
            _, in_dims = next(v for v in PROJECTIONS.values() if v[0] == name)
            L, ins, outs = w.shape[0], w.shape[1 : 1 + in_dims], w.shape[1 + in_dims :]
            names = var.get_metadata().get("out_sharding") or (None,) * len(w.shape)
            a = _init_a(spec, rngs.params(), (L, *ins, spec.rank), math.prod(ins), dtype)
            # the weight's logical axes on each side (layers, embed / heads, ...), the rank replicated
            setattr(layer, f"{name}_lora_a", _adapter(a, (*names[: 1 + in_dims], None)))
            b = jnp.zeros((L, spec.rank, *outs), dtype)
            setattr(layer, f"{name}_lora_b", _adapter(b, (names[0], None, *names[1 + in_dims :])))
    if EMBEDDING in spec.targets:  # PEFT's embedding adapter: A = 0, B ~ N(0, 1)
        V, D = model.embed.shape
        model.embed_lora_a = _adapter(jnp.zeros((V, spec.rank), dtype), ("vocab", None))
        model.embed_lora_b = _adapter(jax.random.normal(rngs.params(), (spec.rank, D)).astype(dtype), (None, "embed"))
    model.lora = spec


def delta(spec: LoraSpec, x: Array, p: dict[str, Array], name: str, key: Array | None = None) -> Array | None:
    """(alpha / r) dropout(x) A B for projection `name` of one layer (p: its arrays), or None when it has no
    adapter. x [B, T, *in] -> [B, T, *out]. key: the dropout key (training); None: no dropout."""
    a, b = p.get(f"{name}_lora_a"), p.get(f"{name}_lora_b")
    if a is None:
        return None
    if key is not None and spec.dropout > 0:
        keep = jax.random.bernoulli(key, 1.0 - spec.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - spec.dropout), 0.0).astype(x.dtype)
    ins = "defg"[: a.ndim - 1]
    outs = "uvw"[: b.ndim - 1]
    xa = jnp.einsum(f"bt{ins},{ins}r->btr", x, a)
    return (jnp.einsum(f"btr,r{outs}->bt{outs}", xa, b) * spec.scale).astype(x.dtype)


def embedding_delta(spec: LoraSpec, tokens: Array, a: Array, b: Array) -> Array:
    """(alpha / r) A[tokens] B: the input embedding's adapter (A [V, r], B [r, D]) for tokens [B, T]."""
    return jnp.einsum("btr,rd->btd", jnp.take(a, tokens, axis=0), b) * spec.scale


_DROPOUT_KEY: contextvars.ContextVar[Array | None] = contextvars.ContextVar("lora_dropout_key", default=None)


@contextlib.contextmanager
def training_dropout(key: Array | None) -> Iterator[None]:
    """Adapters traced inside apply dropout with `key` (the train step's, per update): the forward passes of
    sampling and scoring, traced outside, have none."""
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


def current_dropout_key() -> Array | None:
    return _DROPOUT_KEY.get()


def adapted(spec: LoraSpec | None, y: Array, x: Array, p: dict[str, Array], name: str,
            key: Array | None = None) -> Array:
    """y (the base projection of x) plus its adapter's delta, if it has one."""
    d = None if spec is None else delta(spec, x, p, name, key)
    return y if d is None else plus_delta(y, d)


@jax.custom_vjp
def plus_delta(y: Array, d: Array) -> Array:
    """y + d, computed as y itself while d is all zero (fresh adapters, B = 0): then the consumers of the
    projection read the same buffer they read without adapters, so XLA compiles them alike and a model with
    fresh adapters computes the base model's values bit for bit (adding an exact zero inside a fused
    consumer lets LLVM contract that consumer's multiply-adds differently: 1-2 ulps, measured on Qwen3's
    q-norm). The gradient is that of y + d either way."""
    return jax.lax.cond(jnp.all(d == 0), lambda: y, lambda: y + d)


def _plus_delta_fwd(y: Array, d: Array) -> tuple[Array, None]:
    return plus_delta(y, d), None


def _plus_delta_bwd(_: None, g: Array) -> tuple[Array, Array]:
    return g, g


plus_delta.defvjp(_plus_delta_fwd, _plus_delta_bwd)


def merged_arrays(spec: LoraSpec, p: dict[str, Array], dtype: Any) -> dict[str, Array]:
    """The layer arrays in `dtype` (a quantised base dequantised) with every adapter folded into its
    weight, W + (alpha / r) A B, and dropped."""
    out = {k: compute_array(v, dtype) for k, v in p.items() if "_lora_" not in k}
    for name in spec.projections:
        if f"{name}_lora_a" in p:
            a, b = p[f"{name}_lora_a"], p[f"{name}_lora_b"]
            out[name] = (out[name] + spec.scale * _stacked_product(a, b)).astype(dtype)
    return out


def _stacked_product(a: Array, b: Array) -> Array:
    """A [L, *in, r] x B [L, r, *out] -> [L, *in, *out] per layer."""
    ins, outs = "defg"[: a.ndim - 2], "uvw"[: b.ndim - 2]
    return jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", a, b)


def _plain(model: nnx.Module, cfg: Any = None) -> nnx.Module:
    """An abstract Decoder like `model` (config, dtypes, remat, layout, ops) without adapters."""
    return nnx.eval_shape(lambda: type(model)(cfg or model.cfg, rngs=nnx.Rngs(0), dtype=model.dtype,
                                              param_dtype=model.param_dtype, remat=model.remat,
                                              scan_layers=model.scan_layers, ops=model.ops))


def graphdef_without_adapters(model: nnx.Module) -> nnx.GraphDef:
    """The graph of `model` without its adapters: merged with the base parameters alone it is the base model
    (LoRA's reference, with no second copy of the weights)."""
    return nnx.graphdef(_plain(model))


def merged_model(model: nnx.Module) -> nnx.Module:
    """A copy of the Decoder `model` without adapters, each folded into the weight it adapts. A tied
    embedding with an embedding adapter is untied: the merged input embedding no longer equals the head."""
    spec = model.lora
    untie = spec is not None and EMBEDDING in spec.targets and model.cfg.tie_embeddings
    cfg = dataclasses.replace(model.cfg, tie_embeddings=False) if untie else model.cfg
    new = _plain(model, cfg)
    embed = model.embed[...]
    if spec is not None and EMBEDDING in spec.targets:
        merged = embed + spec.scale * model.embed_lora_a[...] @ model.embed_lora_b[...]
        new.embed.set_value(merged.astype(embed.dtype))
    else:
        new.embed.set_value(embed)
    if not cfg.tie_embeddings:
        new.lm_head_weight.set_value(embed if untie else model.lm_head_weight[...])
    new.final_norm.set_value(model.final_norm[...])
    pairs = [(model.layers, new.layers)] if model.scan_layers else list(zip(model.layers, new.layers))
    for old, fresh in pairs:
        arrays = merged_arrays(spec or LoraSpec(1, 1.0, targets=()), old.arrays(), model.param_dtype)
        for name, value in arrays.items():
            getattr(fresh, name).set_value(value)
    return new
