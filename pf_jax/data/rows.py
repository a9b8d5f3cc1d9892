"""Row validation: each bad row is reported by index and reason, then skipped and counted or, with policy
'stop', raised as BadRowError. Nothing is dropped silently. The checks of each kind of row (prompts,
preference pairs, KTO rows, text or conversational) are pf_jax.data.row_checks'."""

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pf_jax.config.errors import UserError

logger = logging.getLogger(__name__)

MAX_EXAMPLES_KEPT = 20


class DataFileError(UserError):
    """A data source that yields no usable rows, or a file that cannot be read as its format."""


class BadRowError(DataFileError):
    """A malformed data row under policy 'stop'; names the source, the row index and the reason."""

    def __init__(self, source: str, index: int, reason: str) -> None:
        super().__init__(f"bad row {index} in {source}: {reason}",
                         hint="fix the row, or set data.on_bad_row=skip to skip and count bad rows")
        self.source, self.index, self.reason = source, index, reason


@dataclasses.dataclass
class RowReport:
    """What validation kept and skipped: counts per reason kind and the first skipped rows verbatim."""

    source: str
    total: int = 0
    kept: int = 0
    skipped_by_kind: Counter = dataclasses.field(default_factory=Counter)
    examples: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.total - self.kept

    def summary(self) -> str:
        text = f"{self.source}: kept {self.kept} of {self.total} rows"
        if self.skipped:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped_by_kind.items()))
            first = "; ".join(f"row {i}: {r}" for i, r in self.examples[:3])
            text += f", skipped {self.skipped} ({kinds}); first: {first}"
        return text


@dataclasses.dataclass
class ValidatedRows:
    rows: list[dict[str, Any]]
    report: RowReport


@dataclasses.dataclass(frozen=True)
class RowProblem:
    kind: str  # short category for counting, e.g. "missing field"
    reason: str  # full sentence naming the field


def check_text_field(row: Mapping[str, Any], field: str, allow_numbers: bool = False) -> RowProblem | str:
    """The field's text, or the problem with it (missing, wrong type, empty)."""
    if field not in row or row[field] is None:
        return RowProblem("missing field", f"missing field '{field}'")
    value = row[field]
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if allow_numbers and numeric:
        return str(value)
    if not isinstance(value, str):
        expected = "a string or a number" if allow_numbers else "a string"
        return RowProblem("wrong type", f"field '{field}' must be {expected}, got {type(value).__name__} {value!r:.40}")
    if not value.strip():
        return RowProblem("empty field", f"field '{field}' is empty")
    return value


RowCheck = Callable[[Mapping[str, Any]], "dict[str, Any] | RowProblem"]


def validate_rows(
    rows: Iterable[Mapping[str, Any] | RowProblem], check: RowCheck, on_bad_row: str, source: str
) -> ValidatedRows:
    """Apply `check` to every row (a RowProblem in `rows` is a row that failed to parse).

    on_bad_row='stop' raises BadRowError at the first bad row; 'skip' keeps going, counts, and logs a
    warning with the summary. Raises DataFileError if no row is valid.
    """
    if on_bad_row not in ("skip", "stop"):
        raise ValueError(f"on_bad_row must be 'skip' or 'stop', got {on_bad_row!r}")
    report = RowReport(source)
    kept = []
    for index, row in enumerate(rows):
        report.total += 1
        if isinstance(row, RowProblem):
            result: dict[str, Any] | RowProblem = row
        elif not isinstance(row, Mapping):
            result = RowProblem("not an object", f"expected a mapping of fields, got {type(row).__name__}")
        else:
            result = check(row)
        if isinstance(result, RowProblem):
            if on_bad_row == "stop":
                raise BadRowError(source, index, result.reason)
            report.skipped_by_kind[result.kind] += 1
            if len(report.examples) < MAX_EXAMPLES_KEPT:
                report.examples.append((index, result.reason))
            continue
        kept.append(result)
        report.kept += 1
    if report.skipped:
        logger.warning("skipped malformed rows: %s", report.summary())
    if not kept:
        raise DataFileError(f"no valid rows: {report.summary()}")
    return ValidatedRows(kept, report)
