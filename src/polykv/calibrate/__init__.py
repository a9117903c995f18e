"""`polykv calibrate`: per-layer attention statistics and sensitivity curves, to Parquet."""

from __future__ import annotations

from pathlib import Path

from polykv.calibrate.runner import CalibrationConfig, calibrate, finish

REPO_ROOT = Path(__file__).resolve().parents[3]


def default_data_path() -> Path:
    """The shipped calibration set (calibration_data/default.jsonl in a source checkout)."""
    return REPO_ROOT / "calibration_data" / "default.jsonl"


__all__ = ["CalibrationConfig", "calibrate", "finish", "default_data_path"]
