"""Collect the constraint classifier's pseudo-labels from a policy's own responses (self-supervised IF,
arXiv 2510.14420, Sec. 3.2): sample responses to every level 0..k of each instruction (level 0 = the
bare task), then label soft constraint c_j positive on level-j responses and negative on level-(j-1)
ones (`build_pseudo_labels`). The rows feed `method.name: reward_model` as a jsonl.

    python -m pf_jax.pseudo_labels --config X.yaml --out labels.jsonl [k=v ...]

uses the recipe's model, data (a curriculum source), rollout settings and seed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import jax

from pf_jax.data.codec import TextCodec
from pf_jax.models.decoder import Decoder
from pf_jax.sampling.sampler import GenerationConfig
from pf_jax.sampling.texts import sample_texts
from pf_jax.tasks.instructions.curriculum import MultiConstraintInstruction, build_levels
from pf_jax.tasks.instructions.pseudo_labels import PseudoLabel, build_pseudo_labels
from pf_jax.tasks.instructions.rows import write_jsonl


def collect_pseudo_labels(model: Decoder, codec: TextCodec, instructions: Sequence[MultiConstraintInstruction],
                          samples: int, key: jax.Array, gen: GenerationConfig, chunk: int = 32) -> list[PseudoLabel]:
    """`samples` responses of `model` to each level 0..k of each instruction -> soft-constraint pseudo-labels."""
    rows = [r for ins in instructions for r in build_levels(ins, include_base=True)]
    responses, index = sample_texts(model, codec, [r.prompt for r in rows], samples, key, gen, chunk=chunk)
    return build_pseudo_labels([rows[int(i)] for i in index], responses, soft_only=True)


def main(argv: Sequence[str] | None = None) -> Path:
    from pf_jax.config import load_config
    from pf_jax.config.recipe import TrainConfig
    from pf_jax.sampling.texts import generation_config
    from pf_jax.tasks.instructions.reward_model import pseudo_label_rows
    from pf_jax.tasks.instructions.rows import load_curriculum_instructions
    from pf_jax.training.bases import prepare_model
    from pf_jax.training.model_source import load_policy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    prepare_model(cfg.model, cfg.logging.runs_dir)
    model, codec = load_policy(cfg.model, runs_dir=cfg.logging.runs_dir)
    instructions = load_curriculum_instructions(cfg.data, cfg.curriculum.synthetic_instructions)
    labels = collect_pseudo_labels(model, codec, instructions, cfg.rollout.samples_per_prompt,
                                   jax.random.key(cfg.seed), generation_config(cfg.rollout, codec))
    path = write_jsonl(pseudo_label_rows(labels), args.out)
    positives = sum(pl.label for pl in labels)
    print(f"[pf_jax] {len(labels)} pseudo-labels ({positives} positive) from {len(instructions)} instructions -> {path}")
    return path


if __name__ == "__main__":
    main()
