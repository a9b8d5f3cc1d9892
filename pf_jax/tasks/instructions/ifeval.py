"""IFEval-style evaluation: prompt-level and instruction-level accuracy, strict and loose.

IFEval (Zhou et al. 2023, arXiv 2311.07911):
    instruction-level acc = (# instructions followed) / (# instructions), pooled over all prompts;
    prompt-level acc      = (# prompts whose instructions are all followed) / (# prompts).
Strict checks the response as is; loose passes an instruction if any IFEval variant of the response
passes: the response, it without its first line, last line, or both, and each of those four with
markdown asterisks removed. Works on any jsonl in IFEval's format (`prompt`, `instruction_id_list`,
`kwargs`) with the checkers of `pf_jax.tasks.instructions.constraints`; the real IFEval comes from the hub when
online (`load_ifeval_from_hub`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from if_verifiable.common import get_loose_transformations

from pf_jax.tasks.instructions.constraints import Constraint, check_hard_constraint, validate_kwargs


@dataclasses.dataclass(frozen=True)
class IFEvalRow:
    key: str
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class IFEvalResult:
    prompt_strict: float
    prompt_loose: float
    instruction_strict: float
    instruction_loose: float
    per_prompt_strict: list[list[bool]]
    per_prompt_loose: list[list[bool]]
    per_instruction_type: dict[str, dict[str, float]]

    def summary(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("prompt_strict", "prompt_loose", "instruction_strict",
                                              "instruction_loose")}


def ifeval_row_from_dict(row: Mapping[str, Any], index: int) -> IFEvalRow:
    """A row of IFEval's jsonl; None-valued kwargs (the hub's padding) are dropped, then validated."""
    missing = [k for k in ("prompt", "instruction_id_list", "kwargs") if k not in row]
    if missing:
        raise ValueError(f"IFEval row {index}: missing keys {missing}; expected prompt, instruction_id_list, kwargs")
    ids, kwargs = list(row["instruction_id_list"]), list(row["kwargs"])
    if len(ids) != len(kwargs):
        raise ValueError(f"IFEval row {index}: {len(ids)} instruction ids but {len(kwargs)} kwargs")
    try:
        clean = tuple(validate_kwargs(i, k or {}) for i, k in zip(ids, kwargs))
    except (KeyError, ValueError) as err:
        raise ValueError(f"IFEval row {index} (key {row.get('key', index)!r}): {err}") from err
    return IFEvalRow(str(row.get("key", index)), str(row["prompt"]), tuple(ids), clean)


def load_ifeval_jsonl(path: str | Path) -> list[IFEvalRow]:
    with open(path, encoding="utf-8") as f:
        return [ifeval_row_from_dict(json.loads(line), i) for i, line in enumerate(f) if line.strip()]


def load_ifeval_from_hub(name: str = "google/IFEval", split: str = "train") -> list[IFEvalRow]:
    """The real IFEval (541 prompts) via `datasets`; needs network or a populated HF cache."""
    from datasets import load_dataset

    return [ifeval_row_from_dict(r, i) for i, r in enumerate(load_dataset(name, split=split))]


def load_responses(source: str | Path | Sequence[str], rows: Sequence[IFEvalRow]) -> list[str]:
    """Responses aligned with `rows`: a list of strings, or a jsonl of {"prompt", "response"} (IFEval's
    input_response_data format, matched by prompt) or of {"response"} in row order."""
    if not isinstance(source, str | Path):
        responses = list(source)
    else:
        with open(source, encoding="utf-8") as f:
            items = [json.loads(line) for line in f if line.strip()]
        if items and all("prompt" in it for it in items):
            by_prompt = {it["prompt"]: it["response"] for it in items}
            lost = [r.key for r in rows if r.prompt not in by_prompt]
            if lost:
                raise ValueError(f"responses file {source} has no response for rows with keys {lost[:5]}")
            responses = [by_prompt[r.prompt] for r in rows]
        else:
            responses = [it["response"] for it in items]
    if len(responses) != len(rows):
        raise ValueError(f"{len(responses)} responses for {len(rows)} IFEval rows")
    return responses


def evaluate_ifeval(rows: Sequence[IFEvalRow], responses: Sequence[str]) -> IFEvalResult:
    """Strict and loose, prompt- and instruction-level accuracy of `responses` on `rows`."""
    if len(rows) != len(responses):
        raise ValueError(f"{len(responses)} responses for {len(rows)} IFEval rows")
    strict_all, loose_all = [], []
    by_type: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for row, response in zip(rows, responses):
        variants = get_loose_transformations(response)
        strict, loose = [], []
        for type_id, kwargs in zip(row.instruction_id_list, row.kwargs):
            c = Constraint(type_id, kwargs)
            s = check_hard_constraint(c, response, row.prompt)
            lo = s or any(check_hard_constraint(c, v, row.prompt) for v in variants)
            strict.append(s)
            loose.append(lo)
            by_type[type_id].append((s, lo))
        strict_all.append(strict)
        loose_all.append(loose)
    n_prompts = max(len(rows), 1)
    n_instr = max(sum(len(s) for s in strict_all), 1)
    return IFEvalResult(
        prompt_strict=sum(all(s) for s in strict_all) / n_prompts,
        prompt_loose=sum(all(s) for s in loose_all) / n_prompts,
        instruction_strict=sum(sum(s) for s in strict_all) / n_instr,
        instruction_loose=sum(sum(s) for s in loose_all) / n_instr,
        per_prompt_strict=strict_all,
        per_prompt_loose=loose_all,
        per_instruction_type={t: {"strict": sum(s for s, _ in v) / len(v), "loose": sum(lo for _, lo in v) / len(v),
                                  "count": float(len(v))} for t, v in sorted(by_type.items())},
    )


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """`python -m pf_jax.tasks.instructions.ifeval --responses R.jsonl [--data D.jsonl | --hub]`; prints JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="IFEval-format jsonl (prompt, instruction_id_list, kwargs)")
    parser.add_argument("--hub", action="store_true", help="load google/IFEval from the hub")
    parser.add_argument("--responses", required=True, help="jsonl of {prompt, response} or {response}")
    args = parser.parse_args(argv)
    if bool(args.data) == bool(args.hub):
        parser.error("give exactly one of --data or --hub")
    rows = load_ifeval_from_hub() if args.hub else load_ifeval_jsonl(args.data)
    summary = evaluate_ifeval(rows, load_responses(args.responses, rows)).summary()
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
