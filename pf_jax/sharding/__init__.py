"""Device meshes, logical-axis sharding rules and multi-host start-up (the recipe's `mesh` section is
pf_jax.config.mesh; the dry-run memory planner is pf_jax.planning).

    mesh.py         MeshConfig, make_mesh, logical_to_spec, state/optimizer/batch/KV-cache shardings,
                    shard_train_step, transfer between layouts, constrain (activation layout)
    distributed.py  initialize_distributed (explicit PF_* env, SLURM, TPU VM), is_primary
"""

from pf_jax.sharding.distributed import (
    DistributedInfo,
    DistributedSetupError,
    initialize_distributed,
    is_primary,
)
from pf_jax.sharding.mesh import (
    DEFAULT_RULES,
    MESH_AXES,
    MeshConfig,
    activation_sharding,
    batch_shardings,
    constrain,
    global_batch,
    init_sharded,
    kv_cache_shardings,
    logical_to_spec,
    make_mesh,
    optimizer_state_shardings,
    replicated,
    sampler_rules,
    shard_train_step,
    state_shardings,
    train_state_shardings,
    transfer,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "DistributedInfo",
    "DistributedSetupError",
    "MeshConfig",
    "activation_sharding",
    "batch_shardings",
    "constrain",
    "global_batch",
    "init_sharded",
    "initialize_distributed",
    "is_primary",
    "kv_cache_shardings",
    "logical_to_spec",
    "make_mesh",
    "optimizer_state_shardings",
    "replicated",
    "sampler_rules",
    "shard_train_step",
    "state_shardings",
    "train_state_shardings",
    "transfer",
]
