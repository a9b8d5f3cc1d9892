"""Self-supervised instruction following (arXiv 2510.14420): hard constraints checked by code (IFEval /
IFBench verifiers) and soft ones by a constraint classifier trained on pseudo-labels, a constraint-count
curriculum as the prompt source, and IFEval scoring (`python -m pf_jax.tasks.instructions.ifeval`)."""
