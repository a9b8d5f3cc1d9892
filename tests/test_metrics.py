"""Metrics: JSONL records, TensorBoard event files parsed back record by record (length + masked CRC32C
framing, protobuf Events), terminal output, summary, PNG plots, resume truncation, process 0 only."""

import io
import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from rich.console import Console
from tensorboardX.crc32c import crc32c
from tensorboardX.proto.event_pb2 import Event

from pf_jax.config import ConfigError, LoggingConfig
from pf_jax.training.metrics import MetricsLogger, read_metrics


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path) -> list[Event]:
    """TFRecord framing: u64 length, u32 masked crc(length), data, u32 masked crc(data)."""
    raw = path.read_bytes()
    events, offset = [], 0
    while offset < len(raw):
        header = raw[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", raw[offset + 8 : offset + 12])
        assert length_crc == masked_crc(header)
        data = raw[offset + 12 : offset + 12 + length]
        (data_crc,) = struct.unpack("<I", raw[offset + 12 + length : offset + 16 + length])
        assert data_crc == masked_crc(data)
        events.append(Event.FromString(data))
        offset += 16 + length
    return events


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for event in read_events(path):
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def quiet_console():
    buffer = io.StringIO()
    return Console(file=buffer, width=140, force_terminal=False, color_system=None), buffer


def run_steps(logger, steps):
    for step in steps:
        if logger.should_log(step):
            logger.log(step, {"loss": jnp.asarray(1.0 / step), "reward/mean": np.float32(step / 10)})
        else:
            logger.log(step, {})


def test_every_sink_gets_the_same_numbers(tmp_path):
    console, buffer = quiet_console()
    run_dir = tmp_path / "runs" / "demo"
    logger = MetricsLogger(run_dir, total_steps=10, every_steps=3, console=console, config={"lr": 1e-3})
    run_steps(logger, range(1, 11))
    summary = logger.close()
    logged = [3, 6, 9, 10]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == logged
    assert [r["loss"] for r in records] == pytest.approx([1 / s for s in logged])
    tb = scalars(run_dir)
    assert [s for s, _ in tb["loss"]] == logged
    assert [v for _, v in tb["loss"]] == pytest.approx([1 / s for s in logged], rel=1e-6)
    assert [v for _, v in tb["reward/mean"]] == pytest.approx([s / 10 for s in logged], rel=1e-6)
    assert summary["loss"] == pytest.approx({"first": 1 / 3, "last": 0.1, "min": 0.1, "max": 1 / 3,
                                            "mean": np.mean([1 / s for s in logged])})
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert json.loads((run_dir / "config.json").read_text()) == {"lr": 1e-3}
    text = buffer.getvalue()
    assert "step 9/10" in text and "loss 0.1111" in text and "mean" in text and "reward/mean" in text
    for name in ("loss.png", "reward_mean.png", "curves.png"):
        png = (run_dir / "plots" / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000


def test_non_finite_values_are_null_and_non_scalars_rejected(tmp_path):
    console, _ = quiet_console()
    with MetricsLogger(tmp_path, total_steps=2, console=console, tensorboard=False, plots=False) as logger:
        logger.log(1, {"loss": float("nan"), "kl": 0.5})
        logger.log(2, {"loss": 2.0, "kl": float("inf")})
        with pytest.raises(ValueError, match=r"metric 'logits' must be a scalar, got an array of shape \(3,\)"):
            logger.log(2, {"logits": np.ones(3)})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[0]["loss"] is None and records[1]["kl"] is None
    assert logger.summary()["loss"]["mean"] == 2.0


def test_resume_truncates_replayed_steps(tmp_path):
    console, _ = quiet_console()
    with MetricsLogger(tmp_path, total_steps=8, console=console, plots=False) as logger:
        run_steps(logger, range(1, 7))  # killed after step 6, checkpoint at step 4
    with MetricsLogger(tmp_path, total_steps=8, console=console, resume_step=4, plots=False) as logger:
        run_steps(logger, range(5, 9))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 9))
    assert len(logger.history) == 8
    purge = [e for p in (tmp_path / "tensorboard").glob("events.*") for e in read_events(p)
             if e.HasField("session_log")]
    assert [e.step for e in purge] == [5]


def test_only_process_zero_writes(tmp_path):
    logger = MetricsLogger(tmp_path / "p1", total_steps=3, process_index=1)
    run_steps(logger, range(1, 4))
    assert logger.close() == {}
    assert not (tmp_path / "p1").exists()


def test_from_config_and_missing_wandb(tmp_path):
    cfg = LoggingConfig(run_name="r1", runs_dir=str(tmp_path), tensorboard=False, progress_bar=False)
    console, _ = quiet_console()
    logger = MetricsLogger.from_config(cfg, total_steps=1, console=console)
    assert logger.run_dir == tmp_path / "r1"
    logger.log(1, {"x": 1})
    logger.close()
    assert (tmp_path / "r1" / "metrics.jsonl").exists()
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"logging.wandb=true needs the 'wandb' package"):
            MetricsLogger.from_config(cfg.model_copy(update={"wandb": True}), total_steps=1, console=console)
    else:
        pytest.skip("wandb is installed; the missing-package error cannot be exercised")


def test_progress_bar_shows_rate_and_eta(tmp_path):
    buffer = io.StringIO()
    console = Console(file=buffer, width=160, force_terminal=True, color_system=None)
    logger = MetricsLogger(tmp_path, total_steps=4, console=console, tensorboard=False, plots=False)
    run_steps(logger, range(1, 5))
    logger.close()
    text = buffer.getvalue()
    assert "4/4" in text and "steps/s" in text and "ETA" in text
    assert not math.isnan(logger.summary()["loss"]["last"])


def test_resume_drops_a_torn_last_line_and_appends_whole_lines(tmp_path):
    """A SIGKILL (or a full disk) mid-write left half a JSON line; before, the resume died on JSONDecodeError."""
    console, _ = quiet_console()
    logger = MetricsLogger(tmp_path, 10, tensorboard=False, progress_bar=False, plots=False, console=console)
    run_steps(logger, range(1, 4))
    logger.close()
    path = tmp_path / "metrics.jsonl"
    with open(path, "ab") as handle:
        handle.write(b'{"step": 4, "time": 1.0, "lo')  # torn: the process died inside the write
    resumed = MetricsLogger(tmp_path, 10, tensorboard=False, progress_bar=False, plots=False, console=console,
                            resume_step=2)
    run_steps(resumed, range(3, 5))
    resumed.close()
    text = path.read_text()
    assert text.endswith("\n") and '"time": 1.0,' not in text
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in text.splitlines()] == [1, 2, 3, 4]


def test_a_metrics_write_that_fails_names_the_file(tmp_path):
    from pf_jax.config.errors import RunStorageError

    console, _ = quiet_console()
    logger = MetricsLogger(tmp_path, 10, tensorboard=False, progress_bar=False, plots=False, console=console)
    logger._jsonl.close()  # the descriptor is gone, as on a file system that went away
    with pytest.raises(RunStorageError, match=r"cannot append to .*metrics\.jsonl"):
        logger.log(1, {"loss": 1.0})


def test_an_evaluation_off_the_logging_schedule_is_still_written(tmp_path):
    """eval.distribution.every_steps = 3 with logging.every_steps = 5: the probe's step-3 metrics are forced
    through (before, they were dropped from metrics.jsonl), training metrics keep their schedule."""
    console = Console(file=io.StringIO())
    with MetricsLogger(tmp_path, total_steps=10, every_steps=5, console=console, tensorboard=False, plots=False) as logger:
        assert not logger.log(3, {"loss": 1.0})
        assert logger.log(3, {"dist/tv": 0.25}, force=True)
        assert logger.log(5, {"loss": 0.5})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], sorted(k for k in r if k not in ("step", "time"))) for r in records] == [
        (3, ["dist/tv"]), (5, ["loss"])]
