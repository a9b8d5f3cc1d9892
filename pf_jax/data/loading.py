"""Read rows from a local jsonl / parquet file or a hub dataset, and validate them with the configured
bad-row policy (the synthetic tasks' rows, by name, are pf_jax.tasks.sources').

Local jsonl is parsed line by line with the standard library rather than through `datasets`' JSON
builder: that builder infers one type per column and turns a mixed column into JSON-decoded values (the
string "1" becomes the number 1), which would hide exactly the wrong-type rows we must report. Parquet
files (typed columns) and hub datasets go through `datasets`.
"""

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pf_jax.config import ConfigError, DataConfig
from pf_jax.data.row_checks import Render, kto_row_check, preference_row_check, prompt_row_check, rendered
from pf_jax.data.rows import DataFileError, RowProblem, ValidatedRows, validate_rows

LOCAL_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def file_format(cfg: DataConfig) -> str:
    """'jsonl', 'parquet' or 'hub' for `cfg.source`: data.format when given, else by suffix, else hub."""
    if cfg.format != "auto":
        return cfg.format
    suffix = Path(cfg.source).suffix.lower()
    if suffix in LOCAL_FORMATS:
        return LOCAL_FORMATS[suffix]
    if Path(cfg.source).is_file():
        raise ConfigError(f"data file '{cfg.source}' has suffix '{suffix}'; local data files are "
                          f"{', '.join(sorted(LOCAL_FORMATS))} (or set data.format)")
    return "hub"


def _json_array_rows(path: str | Path, data: bytes) -> Iterator[dict[str, Any] | RowProblem]:
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataFileError(f"data file '{path}' is not UTF-8: byte 0x{data[error.start]:02x} at offset "
                            f"{error.start} (line {line})") from None
    except json.JSONDecodeError as error:
        raise DataFileError(f"data file '{path}' is not valid JSON: {error}") from None
    for row in rows:
        yield row if isinstance(row, dict) else RowProblem("not an object", f"expected a JSON object, got {type(row).__name__}")


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any] | RowProblem]:
    """Rows of a jsonl file; row i is the file's line i (0-based). A line that is blank, not UTF-8, not
    JSON or not an object yields a RowProblem so the validator reports it by index. A `.json` file holding
    one array of objects is read too (row i = element i)."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the with below, after the check
    except OSError as error:
        raise ConfigError(f"cannot read data file '{path}': {error.strerror or error}") from None
    with handle:
        if Path(path).suffix.lower() == ".json" and handle.read(1024).lstrip().startswith(b"["):
            handle.seek(0)
            yield from _json_array_rows(path, handle.read())
            return
        handle.seek(0)
        for raw in handle:  # bytes, decoded per line: one bad byte is one bad row, not a bad file
            yield _jsonl_row(raw)


def _jsonl_row(raw: bytes) -> dict[str, Any] | RowProblem:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return RowProblem("not UTF-8", f"byte 0x{raw[error.start]:02x} at column {error.start + 1} is not UTF-8")
    if not line.strip():
        return RowProblem("not JSON", "blank line")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        return RowProblem("not JSON", f"not valid JSON ({error.msg} at column {error.colno})")
    if not isinstance(row, dict):
        return RowProblem("not an object", f"expected a JSON object, got {type(row).__name__}")
    return row


def read_file_rows(cfg: DataConfig, cache_dir: str | None = None, *, hub_hint: str = "") -> Any:
    """The raw rows of a local file or hub dataset source and split (an iterable of dicts / RowProblems).
    hub_hint: appended to the message of a hub dataset that cannot be loaded."""
    kind = file_format(cfg)
    if kind == "jsonl":
        return read_jsonl(cfg.source)
    import datasets

    if kind == "parquet":
        if not Path(cfg.source).is_file():
            raise ConfigError(f"cannot read data file '{cfg.source}': no such file")
        import pyarrow.parquet as pq

        try:  # before datasets, which logs its own traceback-like errors for a damaged file
            pq.read_schema(cfg.source)
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for what is not parquet
            raise DataFileError(f"data file '{cfg.source}' is not a readable parquet file: "
                                f"{type(error).__name__}: {error}"[:600]) from None
        return datasets.load_dataset(
            "parquet", data_files=cfg.source, split="train", cache_dir=cache_dir, keep_in_memory=True
        )
    try:
        return datasets.load_dataset(cfg.source, split=cfg.split, cache_dir=cache_dir)
    except Exception as error:  # datasets raises many kinds (offline, not found, bad split)
        raise ConfigError(
            f"cannot load hub dataset '{cfg.source}' split '{cfg.split}' (data.source is not a local "
            f".jsonl/.parquet file{hub_hint}): {error}"
        ) from error


def validated_prompt_rows(raw: Any, cfg: DataConfig, count_tokens: Callable[[Any], int] | None = None, *,
                          targets_in_messages: bool = False, render: Render | None = None) -> ValidatedRows:
    """Prompt rows {"prompt", "answer"?} of the raw rows of `cfg`'s source, with the skip/stop policy applied
    (targets_in_messages: SFT, which trains on a conversation's assistant turns: {"prompt", "messages"};
    render: encodes a checked row, a chat-template failure making it a bad row)."""
    check = prompt_row_check(cfg.prompt_field, cfg.answer_field, cfg.max_prompt_tokens, count_tokens,
                             messages_field=cfg.messages_field, targets_in_messages=targets_in_messages)
    return validate_rows(raw, rendered(check, render), cfg.on_bad_row, source=f"{cfg.source} [{cfg.split}]")


def validated_kto_rows(raw: Any, cfg: DataConfig, count_tokens: Callable[[Any], int] | None = None, *,
                       render: Render | None = None) -> ValidatedRows:
    """KTO rows {"prompt", "completion", "label"} of the raw rows of `cfg`'s source."""
    check = kto_row_check(cfg.prompt_field, max_prompt_tokens=cfg.max_prompt_tokens, count_tokens=count_tokens)
    return validate_rows(raw, rendered(check, render), cfg.on_bad_row, source=f"{cfg.source} [{cfg.split}]")


def validated_preference_rows(raw: Any, cfg: DataConfig, count_tokens: Callable[[Any], int] | None = None, *,
                              render: Render | None = None) -> ValidatedRows:
    """Preference rows {"prompt", "chosen", "rejected"} of the raw rows of `cfg`'s source."""
    check = preference_row_check(
        cfg.prompt_field, cfg.chosen_field, cfg.rejected_field, cfg.max_prompt_tokens, count_tokens
    )
    return validate_rows(raw, rendered(check, render), cfg.on_bad_row, source=f"{cfg.source} [{cfg.split}]")
