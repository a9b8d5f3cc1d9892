"""Hand-written kernels for what XLA compiles poorly on a platform, each with an XLA fallback."""

from pf_jax.kernels.skinny_matmul import matmul_nn, matmul_nt, matmul_packed, pack_nn, packing_pays

__all__ = ["matmul_nn", "matmul_nt", "matmul_packed", "pack_nn", "packing_pays"]
