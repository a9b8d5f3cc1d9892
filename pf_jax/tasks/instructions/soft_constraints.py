"""Synthetic soft constraints with generators of adhering and non-adhering responses.

For testing the constraint classifier (`pf_jax.tasks.instructions.classifier`) without a model hub: each
soft constraint ("respond in a cheerful tone", "mention an animal", ...) has trait words that make a
response adhere and neutral words that fill the same template slot otherwise, so adhering and
non-adhering responses share templates and length and differ only in the trait. Topics are split into
disjoint train / test sets so held-out accuracy measures more than memorised sentences. Also builds
multi-constraint instructions (hard + soft) for tiny curriculum runs. Deterministic given the seed.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from pf_jax.tasks.instructions.classifier import format_classifier_input
from pf_jax.tasks.instructions.constraints import Constraint
from pf_jax.tasks.instructions.curriculum import MultiConstraintInstruction

Split = Literal["train", "test"]


@dataclasses.dataclass(frozen=True)
class SyntheticSoftConstraint:
    """A soft constraint `text`; a response adheres iff its slot holds one of `trait_words`."""

    name: str
    text: str
    trait_words: tuple[str, ...]
    neutral_words: tuple[str, ...]
    templates: tuple[str, ...]


SOFT_CONSTRAINTS: dict[str, SyntheticSoftConstraint] = {
    "cheerful": SyntheticSoftConstraint(
        "cheerful", "Respond in a cheerful tone.",
        ("wonderful", "delightful", "fantastic", "joyful", "lovely", "amazing", "cheerful", "bright"),
        ("ordinary", "average", "routine", "plain", "standard", "typical", "usual", "regular"),
        ("The {topic} was {slot} today.", "What a {slot} {topic} we had.", "I think the {topic} is {slot}.",
         "Honestly the {topic} felt {slot}.", "Our {topic} turned out {slot}."),
    ),
    "animal": SyntheticSoftConstraint(
        "animal", "Mention an animal.",
        ("dog", "cat", "horse", "rabbit", "fox", "owl", "turtle", "sparrow"),
        ("chair", "lamp", "window", "table", "bottle", "pencil", "carpet", "bucket"),
        ("Near the {topic} there was a {slot}.", "I saw a {slot} during the {topic}.",
         "A {slot} sat beside the {topic}.", "The {topic} reminded me of a {slot}.",
         "We talked about the {topic} and a {slot}."),
    ),
}

_TOPICS = {
    "train": ("garden", "meeting", "picnic", "lecture", "harbor", "market", "concert", "journey", "library",
              "kitchen", "festival", "workshop"),
    "test": ("museum", "village", "rehearsal", "voyage", "bakery", "seminar", "parade", "orchard"),
}


def synthetic_response(constraint: SyntheticSoftConstraint, adheres: bool, rng: np.random.Generator,
                       split: Split = "train", n_sentences: int = 2) -> str:
    """`n_sentences` templated sentences; exactly one slot holds a trait word iff `adheres`."""
    topics = _TOPICS[split]
    trait_at = int(rng.integers(0, n_sentences))
    sentences = []
    for k in range(n_sentences):
        words = constraint.trait_words if adheres and k == trait_at else constraint.neutral_words
        template = constraint.templates[int(rng.integers(0, len(constraint.templates)))]
        sentences.append(template.format(topic=topics[int(rng.integers(0, len(topics)))],
                                         slot=words[int(rng.integers(0, len(words)))]))
    return " ".join(sentences)


def synthetic_soft_examples(name: str, n: int, seed: int, split: Split = "train") -> list[tuple[str, str, int]]:
    """n balanced (response, constraint text, label) triples for soft constraint `name`."""
    if name not in SOFT_CONSTRAINTS:
        raise KeyError(f"unknown synthetic soft constraint {name!r}; expected one of {sorted(SOFT_CONSTRAINTS)}")
    constraint = SOFT_CONSTRAINTS[name]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    labels = rng.permutation(np.arange(n) % 2)
    return [(synthetic_response(constraint, bool(y), rng, split), constraint.text, int(y)) for y in labels]


def synthetic_classifier_inputs(name: str, n: int, seed: int, split: Split = "train") -> tuple[list[str], np.ndarray]:
    """Classifier input texts "Response: {r}. Constraint: {c}" and labels [n] (int32)."""
    examples = synthetic_soft_examples(name, n, seed, split)
    texts = [format_classifier_input(r, c) for r, c, _ in examples]
    return texts, np.array([y for *_, y in examples], np.int32)


def synthetic_multi_constraint_instructions(n: int, seed: int, split: Split = "train"
                                            ) -> list[MultiConstraintInstruction]:
    """Tasks "Write a short note about {topic}." with 2..4 constraints mixing hard and soft ones."""
    rng = np.random.default_rng([seed, 2])
    topics = _TOPICS[split]
    out = []
    for i in range(n):
        topic = topics[int(rng.integers(0, len(topics)))]
        pool = [
            Constraint("keywords:existence", {"keywords": [topic]}),
            Constraint("punctuation:no_comma"),
            Constraint("length_constraints:number_words", {"num_words": 40, "relation": "less than"}),
            Constraint("change_case:english_lowercase"),
            Constraint.soft(SOFT_CONSTRAINTS["cheerful"].text),
            Constraint.soft(SOFT_CONSTRAINTS["animal"].text),
        ]
        k = int(rng.integers(2, 5))
        chosen = tuple(pool[j] for j in rng.permutation(len(pool))[:k])
        out.append(MultiConstraintInstruction(f"{split}-{i}", f"Write a short note about the {topic}.", chosen))
    return out
