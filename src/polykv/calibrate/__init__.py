"""`polykv calibrate`: per-layer attention statistics and sensitivity curves, to Parquet."""

from __future__ import annotations

from pathlib import Path

from polykv.calibrate.runner import CalibrationConfig, calibrate, finish

REPO_ROOT = Path(__file__).resolve().parents[3]


def default_data_path() -> Path:
    """The shipped calibration set (calibration_data/default.jsonl in a source checkout)."""
    return REPO_ROOT / "calibration_data" / "default.jsonl"


def round_robin(samples: list) -> list:
    """All samples, one per category in turn (file order within each category)."""
    by_cat: dict[str, list] = {}
    for s in samples:
        by_cat.setdefault(s.category, []).append(s)
    queues = list(by_cat.values())
    return [q[depth] for depth in range(max(map(len, queues), default=0)) for q in queues if depth < len(q)]


def select_samples(samples: list, n: int | None) -> list:
    """The first `n` samples taken round-robin across categories (file order within each), so that a small
    calibration still covers every category; all samples, in file order, when n is None or covers them all."""
    if n is None or n >= len(samples):
        return list(samples)
    return round_robin(samples)[:n]


__all__ = ["round_robin", "select_samples", "CalibrationConfig", "calibrate", "finish", "default_data_path"]
