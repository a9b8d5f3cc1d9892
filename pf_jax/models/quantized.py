"""QLoRA's frozen base (Dettmers et al. 2023, arXiv 2305.14314): the decoder's projection weights stored
quantised as qwix's quantised arrays (QArray), and dequantised one layer at a time inside the forward pass
(the layer scan slices the stored integers and their scales, never the full-precision weights).

    int8   symmetric, one scale per (layer, output channel)
    int4   symmetric, one scale per (layer, output channel, group of `group_size` inputs)
    nf4    NormalFloat4 codes (QLoRA's), absmax-scaled per the same groups

The adapters (pf_jax.models.lora) train in the compute dtype over the dequantised weights. Embedding, head
and norms stay in full precision, as in QLoRA.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import qwix
from flax import nnx
from jax import Array
from qwix import QArray

from pf_jax.models.errors import ModelInputError

QTYPES = ("int8", "int4", "nf4")
# Our DecoderLayers weight -> its input dims after the layers axis (the rest are output dims).
WEIGHT_INPUTS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    qtype: str = "int8"
    group_size: int = 64  # 4-bit types: inputs sharing one scale (a group that does not divide: per channel)

    def __post_init__(self) -> None:
        if self.qtype not in QTYPES:
            raise ModelInputError(f"quantisation {self.qtype!r} is not one of {QTYPES}")
        if self.group_size < 1:
            raise ModelInputError(f"quantisation group_size must be >= 1, got {self.group_size}")


def quantize_weight(w: Array, inputs: int, spec: QuantSpec) -> QArray:
    """w [L, *in, *out] -> QArray with scales per layer and output channel (and input group for 4-bit)."""
    outs = tuple(range(1 + inputs, w.ndim))
    tiled = {}
    if spec.qtype != "int8":
        last_in = inputs  # the innermost input axis
        size = w.shape[last_in]
        tiled = {last_in: spec.group_size if size % spec.group_size == 0 else size}
    return qwix.quantize(w, spec.qtype, channelwise_axes=(0, *outs), tiled_axes=tiled)


def quantize_base(model: nnx.Module, spec: QuantSpec) -> None:
    """Store every projection weight of `model` (a Decoder) quantised, in place."""
    layers = [model.layers] if model.scan_layers else list(model.layers)
    for layer in layers:
        for name, inputs in WEIGHT_INPUTS.items():
            var = getattr(layer, name)
            var.set_value(quantize_weight(var.get_value(), inputs, spec))


def compute_array(w: Any, dtype: Any) -> Array:
    """A stored weight in the compute dtype: dequantised when it is a QArray."""
    return (qwix.dequantize(w) if isinstance(w, QArray) else w).astype(dtype)


def stored_array(var: nnx.Variable) -> Any:
    """A variable's stored value: an array, or the QArray of a quantised weight."""
    value = var.get_value()
    return value if isinstance(value, QArray) else var[...]


def dequantization_bound(q: QArray, qtype: str) -> Array:
    """The largest |w - dequantize(q)| the quantiser allows, per element: half a step for the integer types
    (round to nearest), half the widest gap between NF4 levels times the group's absmax for NF4."""
    scale = jnp.broadcast_to(_expand(q.scale, q.qvalue.shape), q.qvalue.shape)
    if qtype == "nf4":
        levels = jnp.asarray(NF4_LEVELS)
        return scale * jnp.max(jnp.diff(levels)) / 2
    return scale / 2


def _expand(scale: Array, shape: tuple[int, ...]) -> Array:
    """A tiled scale [.., in / g, ..] repeated over its groups to the weight's shape."""
    for axis, (s, n) in enumerate(zip(scale.shape, shape)):
        if s not in (1, n):
            scale = jnp.repeat(scale, n // s, axis=axis)
    return scale


# QLoRA's NF4 code book (arXiv 2305.14314, Appendix E): quantiles of N(0, 1) normalised to [-1, 1].
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
