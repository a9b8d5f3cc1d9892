"""Rewards that do not belong to one task: text rewards built from an answer checker (correctness,
majority vote), and RewardFlow's state-graph propagation and per-step advantages. The named rewards a
recipe picks (`reward.name`) are pf_jax.tasks.rewards'."""
