"""Data as the trainer reads it: codecs (text <-> token ids), the training batch layout, row loading from
files and hub datasets, row validation, and the resumable batch iterator. Synthetic tasks' rows are
pf_jax.tasks'."""

from pf_jax.data.iterator import BatchIterator, IteratorState
from pf_jax.data.rows import BadRowError, RowReport, ValidatedRows

__all__ = ["BadRowError", "BatchIterator", "IteratorState", "RowReport", "ValidatedRows"]
