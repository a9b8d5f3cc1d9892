"""The one training loop and what it needs: the jitted step (step.py), the recipe's update (update.py), the
optimizer, checkpoints, metrics, mesh placement, model loading and the built-in base models, the
evaluation hooks, and `train(cfg)` (run.py). Methods are composed in pf_jax.methods; the loop knows only
their protocols."""
