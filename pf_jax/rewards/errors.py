"""Rewards that cannot be used: a reward function's or an environment's output that is not one finite
number per response or state."""

from pf_jax.config.errors import UserError


class RewardOutputError(UserError):
    """A reward of NaN or inf, or not one per response: names the reward function or the state."""
