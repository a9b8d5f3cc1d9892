"""Constraint types for instruction following: hard ones checked by code, soft ones by a classifier.

A hard constraint type is an IFEval / IFBench checker of PyPI `if-verifiable` plus a kwargs schema (the
checkers themselves fill a missing kwarg with a *random* value, so kwargs are validated here first).
A soft constraint is natural-language text ("respond in a cheerful tone"); its score comes from a soft
scorer (see `pf_jax.tasks.instructions.classifier`). Papers: IFEval (Zhou et al. 2023, arXiv 2311.07911),
IFBench (Pyatkin et al. 2025, arXiv 2507.02833), self-supervised IF (arXiv 2510.14420).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, Literal

from pf_jax.tasks.instructions.nltk_data import (
    NltkDataMissingError,
    ensure_nltk_offline_data,
    nltk_downloads_disabled,
)

SOFT_CONSTRAINT_ID = "soft:text"
RELATIONS = ("less than", "at least")
KwargKind = Literal["int", "str", "str_list", "relation", "letter"]


class UnknownConstraintError(KeyError):
    """A constraint id that is not in the registry."""

    def __str__(self) -> str:
        return str(self.args[0])


class MalformedKwargsError(ValueError):
    """Kwargs that do not match a constraint type's schema."""


@dataclasses.dataclass(frozen=True)
class KwargSpec:
    kind: KwargKind
    required: bool = True


@dataclasses.dataclass(frozen=True)
class ConstraintType:
    """A registered constraint type: `kind` hard (code checker) or soft (classifier on `description`)."""

    id: str
    kind: Literal["hard", "soft"]
    description: str
    kwargs_schema: Mapping[str, KwargSpec]
    source: Literal["ifeval", "ifbench", "text"]
    nltk_resources: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Constraint:
    """One constraint of an instruction: a registered type id, its kwargs, and (soft) its text."""

    type_id: str
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    text: str = ""

    @staticmethod
    def soft(text: str) -> Constraint:
        return Constraint(SOFT_CONSTRAINT_ID, {}, text)


_I, _S, _L, _R, _C = (KwargSpec("int"), KwargSpec("str"), KwargSpec("str_list"), KwargSpec("relation"),
                      KwargSpec("letter"))
_IFEVAL: tuple[tuple[str, str, dict[str, KwargSpec]], ...] = (
    ("keywords:existence", "include the keywords", {"keywords": _L}),
    ("keywords:frequency", "use a keyword a number of times", {"keyword": _S, "frequency": _I, "relation": _R}),
    ("keywords:forbidden_words", "do not use the forbidden words", {"forbidden_words": _L}),
    ("keywords:letter_frequency", "use a letter a number of times",
     {"letter": _C, "let_frequency": _I, "let_relation": _R}),
    ("language:response_language", "answer in a given language (ISO 639-1)", {"language": _S}),
    ("length_constraints:number_sentences", "number of sentences", {"num_sentences": _I, "relation": _R}),
    ("length_constraints:number_paragraphs", "paragraphs separated by ***", {"num_paragraphs": _I}),
    ("length_constraints:number_words", "number of words", {"num_words": _I, "relation": _R}),
    ("length_constraints:nth_paragraph_first_word", "paragraph n starts with a word",
     {"num_paragraphs": _I, "nth_paragraph": _I, "first_word": _S}),
    ("detectable_content:number_placeholders", "square-bracket placeholders", {"num_placeholders": _I}),
    ("detectable_content:postscript", "end with a postscript", {"postscript_marker": _S}),
    ("detectable_format:number_bullet_lists", "exact number of markdown bullets", {"num_bullets": _I}),
    ("detectable_format:constrained_response", "answer with one of the given options", {}),
    ("detectable_format:number_highlighted_sections", "highlight sections with *...*", {"num_highlights": _I}),
    ("detectable_format:multiple_sections", "sections marked by a splitter",
     {"section_spliter": _S, "num_sections": _I}),
    ("detectable_format:json_format", "whole output is JSON", {}),
    ("detectable_format:title", "a title in <<double angular brackets>>", {}),
    ("combination:two_responses", "two responses separated by ******", {}),
    ("combination:repeat_prompt", "repeat the request first, then answer", {"prompt_to_repeat": _S}),
    ("startend:end_checker", "end with an exact phrase", {"end_phrase": _S}),
    ("change_case:capital_word_frequency", "number of all-capital words",
     {"capital_frequency": _I, "capital_relation": _R}),
    ("change_case:english_capital", "English, all capital letters", {}),
    ("change_case:english_lowercase", "English, all lowercase letters", {}),
    ("punctuation:no_comma", "no commas", {}),
    ("startend:quotation", "wrap the whole response in double quotes", {}),
)
# (id, description, schema, NLTK resources the checker needs)
_IFBENCH: tuple[tuple[str, str, dict[str, KwargSpec], tuple[str, ...]], ...] = (
    ("count:word_count_range", "word count within a range", {"min_words": _I, "max_words": _I}, ()),
    ("count:unique_word_count", "at least N unique words", {"N": _I}, ()),
    ("count:numbers", "exactly N numbers", {"N": _I}, ()),
    ("format:no_whitespace", "no whitespace at all", {}, ()),
    ("words:palindrome", "at least 10 palindromes of length >= 5", {}, ()),
    ("words:start_verb", "start with a verb", {}, ("punkt_tab", "averaged_perceptron_tagger_eng")),
    ("ratio:stop_words", "at most a percentage of stop words", {"percentage": _I}, ("stopwords",)),
)

# IFEval checkers that tokenize with Punkt (sentence counting, nltk.word_tokenize); the rest use regexes.
_IFEVAL_PUNKT = ("length_constraints:number_sentences", "change_case:capital_word_frequency")
CONSTRAINT_TYPES: dict[str, ConstraintType] = {
    **{cid: ConstraintType(cid, "hard", desc, schema, "ifeval", ("punkt_tab",) if cid in _IFEVAL_PUNKT else ())
       for cid, desc, schema in _IFEVAL},
    **{cid: ConstraintType(cid, "hard", desc, schema, "ifbench", res) for cid, desc, schema, res in _IFBENCH},
    SOFT_CONSTRAINT_ID: ConstraintType(SOFT_CONSTRAINT_ID, "soft", "natural-language constraint", {}, "text"),
}


def constraint_type(type_id: str) -> ConstraintType:
    """The registered type for `type_id`; `UnknownConstraintError` naming the nearest ids otherwise."""
    if type_id not in CONSTRAINT_TYPES:
        near = difflib.get_close_matches(str(type_id), CONSTRAINT_TYPES, n=2)
        hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
        raise UnknownConstraintError(f"unknown constraint id {type_id!r}{hint}")
    return CONSTRAINT_TYPES[type_id]


def _kwarg_ok(spec: KwargSpec, value: Any) -> bool:
    if spec.kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if spec.kind == "str":
        return isinstance(value, str) and bool(value.strip())
    if spec.kind == "str_list":
        return isinstance(value, list | tuple) and bool(value) and all(isinstance(v, str) and v for v in value)
    if spec.kind == "relation":
        return value in RELATIONS
    return isinstance(value, str) and len(value) == 1 and value.isalpha()


def validate_kwargs(type_id: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Kwargs checked against the schema, None-valued keys dropped (IFEval rows carry unused keys as None).

    Raises `MalformedKwargsError` naming the key and what was expected.
    """
    ctype = constraint_type(type_id)
    if not isinstance(kwargs, Mapping):
        raise MalformedKwargsError(f"{type_id}: kwargs must be a mapping, got {type(kwargs).__name__}")
    given = {k: v for k, v in kwargs.items() if v is not None}
    for key in given:
        if key not in ctype.kwargs_schema:
            raise MalformedKwargsError(
                f"{type_id}: unexpected kwarg {key!r}; expected keys {sorted(ctype.kwargs_schema)}")
    for key, spec in ctype.kwargs_schema.items():
        if key not in given:
            if spec.required:
                raise MalformedKwargsError(f"{type_id}: missing kwarg {key!r} ({spec.kind})")
            continue
        if not _kwarg_ok(spec, given[key]):
            expected = f"one of {RELATIONS}" if spec.kind == "relation" else spec.kind
            raise MalformedKwargsError(f"{type_id}: kwarg {key!r}={given[key]!r}; expected {expected}")
    return given


def _checker_class(ctype: ConstraintType) -> type:
    """The if-verifiable checker class of a hard constraint (imported here: `extras` dependencies)."""
    import langdetect

    # langdetect samples internally; a fixed seed makes language checks (and so rewards) reproducible.
    langdetect.DetectorFactory.seed = 0
    if ctype.source == "ifeval":
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    else:
        ensure_nltk_offline_data()
        with nltk_downloads_disabled():  # ifbench's util module calls nltk.download at import
            from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT
    return INSTRUCTION_DICT[ctype.id]


def check_hard_constraint(constraint: Constraint, response: str, prompt: str = "") -> bool:
    """True iff `response` satisfies the hard `constraint` (strict IFEval semantics).

    Raises UnknownConstraintError / MalformedKwargsError for bad constraints and NltkDataMissingError when
    the checker needs NLTK data that is not installed (never a silent False).
    """
    ctype = constraint_type(constraint.type_id)
    if ctype.kind != "hard":
        raise ValueError(f"constraint {constraint.type_id!r} is soft; score it with a soft scorer")
    kwargs = validate_kwargs(ctype.id, constraint.kwargs)
    status = ensure_nltk_offline_data()
    for resource in ctype.nltk_resources:
        if resource in status.missing:
            raise NltkDataMissingError(
                f"constraint {ctype.id!r} needs NLTK resource {resource!r}, which is not installed "
                f"(offline; pf_jax never downloads). Put it under one of nltk.data.path.")
    checker = _checker_class(ctype)(ctype.id)
    checker.build_description(**kwargs)
    args = checker.get_instruction_args()
    if args and "prompt" in args:
        checker.build_description(prompt=prompt)
    if not response.strip():
        return False
    try:
        return bool(checker.check_following(response))
    except LookupError as err:
        raise NltkDataMissingError(f"constraint {ctype.id!r}: NLTK resource missing: {err}") from err


def describe_constraint(constraint: Constraint) -> str:
    """The instruction text for a constraint: the IFEval/IFBench checker's own phrasing for hard ones."""
    ctype = constraint_type(constraint.type_id)
    if ctype.kind == "soft":
        if not constraint.text.strip():
            raise MalformedKwargsError("soft constraint with empty text")
        return constraint.text
    checker = _checker_class(ctype)(ctype.id)
    return str(checker.build_description(**validate_kwargs(ctype.id, constraint.kwargs)))


def constraint_from_dict(item: Mapping[str, Any]) -> Constraint:
    """`{"id": type_id, "kwargs": {...}}` for a hard constraint, `{"text": "..."}` for a soft one."""
    if not isinstance(item, Mapping):
        raise MalformedKwargsError(f"a constraint is a mapping with 'id'/'kwargs' or 'text', got {item!r}")
    if "text" in item and item.get("id", SOFT_CONSTRAINT_ID) == SOFT_CONSTRAINT_ID:
        return Constraint.soft(str(item["text"]))
    if "id" not in item:
        raise MalformedKwargsError(f"constraint {dict(item)!r} has neither 'id' nor 'text'")
    return Constraint(str(item["id"]), item.get("kwargs") or {})


def constraints_from_row(row: Mapping[str, Any] | Any) -> tuple[Constraint, ...]:
    """The constraints of a data row in any of the formats pf_jax reads.

    - an object with a `constraints` attribute (a curriculum row);
    - `{"constraints": [{"id": ..., "kwargs": ...} | {"text": ...}, ...]}` (pf_jax jsonl);
    - `{"instruction_id_list": [...], "kwargs": [...]}` (IFEval / IFBench jsonl).
    """
    if hasattr(row, "constraints"):
        return tuple(row.constraints)
    if not isinstance(row, Mapping):
        raise MalformedKwargsError(f"a row is a mapping or a curriculum row, got {type(row).__name__}")
    if "constraints" in row:
        return tuple(constraint_from_dict(c) for c in row["constraints"])
    if "instruction_id_list" in row:
        ids, kwargs = list(row["instruction_id_list"]), row.get("kwargs") or [{} for _ in row["instruction_id_list"]]
        if len(kwargs) != len(ids):
            raise MalformedKwargsError(f"row has {len(ids)} instruction ids but {len(kwargs)} kwargs entries")
        return tuple(Constraint(str(i), k or {}) for i, k in zip(ids, kwargs))
    raise MalformedKwargsError(f"row has no 'constraints' or 'instruction_id_list' (keys: {sorted(row)})")
