"""ModelConfig: one frozen description of a Llama 3 / Qwen2 / Qwen3 / Gemma 3 decoder, and its HF mapping."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from pf_jax.models.errors import UnsupportedArchitectureError

# HF model_type -> our architecture name.
HF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
HF_ARCHITECTURE_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the decoder; every field is hashable so the config can be a jit static arg."""

    architecture: str  # "llama" | "qwen2" | "qwen3" | "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # gemma3 sliding layers' base; global layers use rope_theta
    rope_scaling: tuple | None = None  # (("rope_type", "llama3"), ("factor", 8.0), ...) for global layers
    rms_norm_eps: float = 1e-6
    norm_weight_offset: float = 0.0  # gemma: scale = 1 + w
    embed_scale: bool = False  # gemma: embeddings * sqrt(hidden)
    qk_norm: bool = False
    attention_bias: bool = False
    sandwich_norm: bool = False
    activation: str = "silu"  # "silu" | "gelu_tanh"
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer "full" | "sliding"; () = all full
    query_pre_attn_scalar: float | None = None
    tie_embeddings: bool = False
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None  # attention logits c tanh(z / c) (HF attn_logit_softcapping)
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in HF_ARCHITECTURE_CLASSES:
            raise UnsupportedArchitectureError(
                f"architecture {self.architecture!r} is not supported; supported: "
                f"{sorted(HF_ARCHITECTURE_CLASSES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"activation {self.activation!r}; expected 'silu' or 'gelu_tanh'")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries; expected {self.num_layers}")
        bad = set(self.layer_types) - {"full", "sliding"}
        if bad:
            raise ValueError(f"layer_types entries {sorted(bad)}; expected 'full' or 'sliding'")
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has 'sliding' layers but sliding_window is not set")
        if self.rope_scaling and dict(self.rope_scaling).get("rope_type") not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"rope_type {dict(self.rope_scaling).get('rope_type')!r}; supported: {SUPPORTED_ROPE_TYPES}"
            )

    @property
    def is_sliding(self) -> tuple[bool, ...]:
        """Per layer: True where the layer uses sliding-window attention."""
        types = self.layer_types or ("full",) * self.num_layers
        return tuple(t == "sliding" for t in types)

    @property
    def attention_scale(self) -> float:
        """Multiplier of q.k: query_pre_attn_scalar ** -0.5 (gemma) else head_dim ** -0.5."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def tiny(cls, architecture: str = "llama", vocab_size: int = 64, **overrides: Any) -> ModelConfig:
        """A ~100k-parameter model of the given family for tests and the from-scratch default run."""
        base: dict[str, Any] = dict(
            architecture=architecture,
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            max_position_embeddings=512,
        )
        if architecture == "qwen2":
            base.update(attention_bias=True)
        elif architecture == "qwen3":
            base.update(qk_norm=True)
        elif architecture == "gemma3":
            base.update(_gemma3_family(), sliding_window=8, layer_types=("sliding", "full"),
                        query_pre_attn_scalar=16.0)
        return cls(**{**base, **overrides})

    @classmethod
    def from_hf(cls, hf_config: dict) -> ModelConfig:
        """Map a transformers config.json dict (v4 or v5 rope format) to a ModelConfig."""
        model_type = hf_config.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            hint = " (a multimodal gemma3 config: load its text_config)" if model_type == "gemma3" else ""
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} is not supported{hint}; supported model_types: "
                f"{sorted(HF_MODEL_TYPES)}"
            )
        arch = HF_MODEL_TYPES[model_type]
        if hf_config.get("use_bidirectional_attention"):
            raise UnsupportedArchitectureError(f"{model_type} with use_bidirectional_attention=true is not supported")
        if hf_config.get("mlp_bias"):
            raise UnsupportedArchitectureError(f"{model_type} with mlp_bias=true is not supported")
        num_layers = int(hf_config["num_hidden_layers"])
        num_heads = int(hf_config["num_attention_heads"])
        head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // num_heads
        eos = hf_config.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        full_rope, local_rope = _hf_rope(hf_config, arch)
        kwargs: dict[str, Any] = dict(
            architecture=arch,
            vocab_size=int(hf_config["vocab_size"]),
            hidden_size=int(hf_config["hidden_size"]),
            intermediate_size=int(hf_config["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf_config.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=float(full_rope.pop("rope_theta")),
            rope_scaling=_rope_scaling_tuple(full_rope),
            rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            attention_bias=bool(hf_config.get("attention_bias", arch == "qwen2")),
            qk_norm=arch in ("qwen3", "gemma3"),
            tie_embeddings=bool(hf_config.get("tie_word_embeddings", arch == "gemma3")),
            max_position_embeddings=int(hf_config.get("max_position_embeddings", 8192)),
            bos_token_id=hf_config.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf_config.get("pad_token_id"),
            activation=_hf_activation(hf_config.get("hidden_activation") or hf_config.get("hidden_act")),
            layer_types=_hf_layer_types(hf_config, arch, num_layers),
        )
        if "sliding" in kwargs["layer_types"]:
            kwargs["sliding_window"] = int(hf_config["sliding_window"])
        if arch == "gemma3":
            kwargs.update(
                _gemma3_family(),
                rope_local_theta=float(local_rope["rope_theta"]),
                query_pre_attn_scalar=float(hf_config.get("query_pre_attn_scalar", 256)),
                final_logit_softcap=hf_config.get("final_logit_softcapping"),
                attn_logit_softcap=hf_config.get("attn_logit_softcapping"),
            )
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """config.json that AutoModelForCausalLM loads unchanged: transformers 5's `rope_parameters`, and the
        keys transformers 4.x and vLLM read instead (`rope_theta`, `rope_scaling`, Gemma 3's
        `rope_local_base_freq`), which transformers 5 ignores when rope_parameters is given."""
        full_rope = {"rope_type": "default", **dict(self.rope_scaling or ()), "rope_theta": self.rope_theta}
        out: dict[str, Any] = dict(
            architectures=[HF_ARCHITECTURE_CLASSES[self.architecture]],
            model_type={v: k for k, v in HF_MODEL_TYPES.items()}[self.architecture],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            pad_token_id=self.pad_token_id,
            rope_parameters=full_rope,
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
        )
        act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[self.activation]
        if self.architecture != "qwen2":
            out["attention_bias"] = self.attention_bias
        if self.architecture in ("qwen2", "qwen3"):
            out["use_sliding_window"] = "sliding" in self.layer_types
        if self.architecture != "llama":
            out["layer_types"] = [f"{'sliding' if s else 'full'}_attention" for s in self.is_sliding]
            out["sliding_window"] = self.sliding_window
        if self.architecture == "gemma3":
            out.update(
                hidden_activation=act,
                query_pre_attn_scalar=_int_if_integral(self.query_pre_attn_scalar),
                final_logit_softcapping=self.final_logit_softcap,
                attn_logit_softcapping=self.attn_logit_softcap,
                rope_parameters={
                    "full_attention": full_rope,
                    "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_theta},
                },
                rope_local_base_freq=self.rope_local_theta,
            )
        else:
            out["hidden_act"] = act
        return out


def _int_if_integral(x: float | None) -> float | int | None:
    # transformers' strict config validation wants an int where the field is typed int.
    return int(x) if x is not None and float(x).is_integer() else x


def _gemma3_family() -> dict[str, Any]:
    return dict(norm_weight_offset=1.0, embed_scale=True, qk_norm=True, sandwich_norm=True,
                activation="gelu_tanh", tie_embeddings=True, rope_theta=1_000_000.0, rope_local_theta=10_000.0)


def _hf_activation(name: str | None) -> str:
    if name in (None, "silu", "swish"):
        return "silu"
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return "gelu_tanh"
    raise UnsupportedArchitectureError(f"activation {name!r}; supported: silu, gelu_pytorch_tanh")


def _hf_rope(hf: dict, arch: str) -> tuple[dict, dict]:
    """(global-layer rope params, sliding-layer rope params) from either the v5 or the v4 config format."""
    params = hf.get("rope_parameters")
    if arch == "gemma3":
        if params and "full_attention" in params:
            return dict(params["full_attention"]), dict(params.get("sliding_attention") or {"rope_theta": 1e4})
        full = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1_000_000.0)}
        return full, {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    if params:
        return dict(params), {}
    full = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 10_000.0)}
    return full, {}


def _rope_scaling_tuple(rope: dict) -> tuple | None:
    rope = dict(rope)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(f"rope_type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return None
    keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return (("rope_type", rope_type), *((k, rope[k]) for k in keep if k in rope))


def _hf_layer_types(hf: dict, arch: str, num_layers: int) -> tuple[str, ...]:
    types = hf.get("layer_types")
    if types is None and arch == "gemma3":
        pattern = int(hf.get("sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if types is None and hf.get("use_sliding_window"):
        start = int(hf.get("max_window_layers", num_layers))
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
    if types is None or all(t == "full_attention" for t in types):
        return ()
    if arch in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        return ()
    bad = set(types) - {"full_attention", "sliding_attention"}
    if bad:
        raise UnsupportedArchitectureError(f"layer_types {sorted(bad)}; supported: full/sliding_attention")
    return tuple("sliding" if t == "sliding_attention" else "full" for t in types)


def rope_inverse_frequencies(cfg: ModelConfig, *, sliding: bool) -> list[float]:
    """RoPE inverse frequencies inv_freq[i] = base^(-2i/Dh), i < Dh/2 (Su et al. 2021, RoFormer).

    Global layers use rope_theta with optional scaling: "linear" divides all by factor; "llama3"
    (Llama 3.1 report) divides low frequencies (wavelength > L/low_freq_factor) by factor, keeps high
    ones (wavelength < L/high_freq_factor) and interpolates smoothly in between, L = original max length.
    Sliding layers use rope_local_theta (gemma3) unscaled.
    """
    base = cfg.rope_local_theta if (sliding and cfg.rope_local_theta) else cfg.rope_theta
    dim = cfg.head_dim
    inv = [1.0 / (base ** (i / dim)) for i in range(0, dim, 2)]
    scaling = dict(cfg.rope_scaling or ())
    if sliding or not scaling:
        return inv
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return [f / factor for f in inv]
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < old_len / high:
            out.append(f)
        elif wavelen > old_len / low:
            out.append(f / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out
