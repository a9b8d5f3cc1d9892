"""Evaluation problem sets: local jsonl always; known benchmarks by hub name when online."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pf_jax.config.errors import UserError
from pf_jax.data.rows import DataFileError
from pf_jax.evaluation.scoring import Problem


class BenchmarkUnavailableError(UserError, RuntimeError):
    """A named benchmark could not be loaded from the hub (offline, no cache, renamed)."""


@dataclass(frozen=True)
class HubBenchmark:
    """Where a benchmark lives on the Hugging Face hub and which fields hold prompt and reference."""

    path: str
    split: str
    prompt_field: str
    reference: Callable[[dict[str, Any]], Any]
    checker: str
    config: str | None = None


def _gsm8k_answer(row: dict[str, Any]) -> str:
    return row["answer"].rsplit("####", 1)[-1].strip().replace(",", "")


HUB_BENCHMARKS: dict[str, HubBenchmark] = {
    "math500": HubBenchmark("HuggingFaceH4/MATH-500", "test", "problem", lambda r: r["answer"], "math"),
    "gsm8k": HubBenchmark("openai/gsm8k", "test", "question", _gsm8k_answer, "math", config="main"),
    "aime24": HubBenchmark("HuggingFaceH4/aime_2024", "train", "problem", lambda r: r["answer"], "math"),
    "aime25": HubBenchmark("math-ai/aime25", "test", "problem", lambda r: r["answer"], "math"),
    "amc23": HubBenchmark("math-ai/amc23", "test", "question", lambda r: r["answer"], "math"),
    "ifeval": HubBenchmark("google/IFEval", "train", "prompt",
                           lambda r: {"instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]},
                           "instructions"),
}


def jsonl_lines(path: str | Path, what: str) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed JSON) for each non-empty line; a missing file or a line that is
    not JSON raises an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{what} {path} does not exist")
    for line_number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield line_number, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataFileError(f"{path}:{line_number}: byte 0x{raw[exc.start]:02x} at column {exc.start + 1} "
                                "is not UTF-8") from None
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}:{line_number}: not a JSON object ({exc.msg})") from None


def load_jsonl_problems(path: str | Path, prompt_field: str = "prompt", reference_field: str = "answer",
                        id_field: str = "id", limit: int | None = None) -> list[Problem]:
    """One problem per non-empty line: {prompt_field: str, reference_field: any, id_field: optional}."""
    path = Path(path)
    problems = []
    for line_number, row in jsonl_lines(path, "problem file"):
        if not isinstance(row, dict) or prompt_field not in row or reference_field not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataFileError(f"{path}:{line_number}: expected fields {prompt_field!r} and {reference_field!r}, "
                             f"got {keys}")
        problems.append(Problem(prompt=str(row[prompt_field]), reference=row[reference_field],
                                problem_id=str(row.get(id_field, line_number))))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise DataFileError(f"problem file {path} holds no problems")
    return problems


def load_problems(source: str, limit: int | None = None, **jsonl_fields: str) -> list[Problem]:
    """A local ``.jsonl`` path, or a known benchmark name (``HUB_BENCHMARKS``) loaded with ``datasets``
    (needs the network or a warm datasets cache)."""
    if source.endswith(".jsonl") or Path(source).is_file():
        return load_jsonl_problems(source, limit=limit, **jsonl_fields)
    key = source.lower()
    if key not in HUB_BENCHMARKS:
        raise DataFileError(f"unknown problem source {source!r}: not a .jsonl file; known benchmarks are "
                         f"{sorted(HUB_BENCHMARKS)}")
    spec = HUB_BENCHMARKS[key]
    from datasets import load_dataset

    try:
        rows = load_dataset(spec.path, spec.config, split=spec.split)
    except Exception as exc:  # offline, missing cache, renamed dataset: one message that says which
        raise BenchmarkUnavailableError(f"could not load benchmark {source!r} from the hub ({spec.path}, split "
                           f"{spec.split!r}): {type(exc).__name__}: {exc}. Offline, pass a local .jsonl "
                           f"instead.") from exc
    problems = []
    for index, row in enumerate(rows):
        problems.append(Problem(prompt=row[spec.prompt_field], reference=spec.reference(row),
                                problem_id=str(row.get("unique_id", row.get("id", index)))))
        if limit is not None and len(problems) >= limit:
            break
    return problems
