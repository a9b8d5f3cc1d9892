"""A post-training method is three objects (DESIGN.md), composed here and run by pf_jax.training:

    PromptSource    prompts.py          the rows of each step: a dataset, the instruction curriculum, a task pool
    ResponseSource  responses.py,       dataset responses, policy / reference samples, pairs from samples,
                    env_rollouts.py     environment episodes; scored as the objective declares (Needs)
    Objective       supervised.py, policy_gradient.py, gflownet.py, preference.py, classifier.py, agentic.py:
                    its typed batch (batches.py), its estimator, a pure loss of pf_jax.losses

`registry.METHODS` names every method in one record (`Method`); `compose.compose(cfg)` builds the recipe's.
Adding a method: a pure loss in pf_jax/losses, one `Method(...)` line in registry.py (a new objective here
only when no existing one fits), its property test, and `method.name: <name>` in a recipe.
"""

from pf_jax.methods.compose import Composition, check_recipe, compose, load_recipe
from pf_jax.methods.registry import METHODS, Method, get_method, make_advantage_fn, make_loss_fn

__all__ = ["METHODS", "Composition", "Method", "check_recipe", "compose", "get_method", "load_recipe",
           "make_advantage_fn", "make_loss_fn"]
