"""Read a calibration directory (`polykv calibrate` output) and check that its parts describe one model.

Layout: DIR/metadata.json and DIR/curves/ (a Parquet dataset of part files, tidy long format; see
docs/plan-format.md). Loading checks that the curves' fingerprint column matches metadata.json, and hashes the
Parquet files so that plans can record exactly which data they were solved from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from polykv.errors import CalibrationError, PlanError
from polykv.plan import check_fingerprint, fingerprint_hash, fingerprint_hash_matches

CURVE_COLUMNS = (
    "model",
    "fingerprint",
    "sample_id",
    "category",
    "layer",
    "head",
    "policy",
    "budget",
    "metric",
    "value",
)
METADATA_KEYS = ("model", "fingerprint", "fingerprint_hash")


@dataclass
class Calibration:
    """A loaded calibration directory: metadata, the curves table, and the hash of its Parquet files."""

    path: Path
    metadata: dict
    curves: pd.DataFrame
    parquet_hash: str

    @property
    def model(self) -> str:
        return self.metadata["model"]

    @property
    def fingerprint(self) -> dict:
        return self.metadata["fingerprint"]

    def policy_params(self) -> dict[str, dict]:
        """Parameters each policy was calibrated with (metadata settings.policy_params), written into plans."""
        params = (self.metadata.get("settings") or {}).get("policy_params") or {}
        return {str(k): dict(v) for k, v in params.items()} if isinstance(params, dict) else {}

    def provenance(self) -> dict:
        """What a plan records about its calibration data."""
        return {
            "calibration_data_hash": self.metadata.get("data_hash"),
            "parquet_hash": self.parquet_hash,
            "calibration_polykv_version": self.metadata.get("polykv_version"),
        }


def hash_parquet(curves_dir: Path) -> str:
    """sha256 (first 16 hex) over the sorted Parquet part files: relative path and bytes of each."""
    h = hashlib.sha256()
    for part in sorted(curves_dir.rglob("*.parquet")):
        h.update(part.relative_to(curves_dir).as_posix().encode() + b"\0")
        with part.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_metadata(path: Path) -> dict:
    """The checked metadata.json of a calibration directory (CalibrationError naming the fix otherwise)."""
    meta_path = path / "metadata.json"
    if not meta_path.is_file() and (path / "run.json").is_file():
        raise CalibrationError(
            f"{path} holds an unfinished calibration (no metadata.json yet); run the same "
            "`polykv calibrate` command again to finish it"
        )
    if not meta_path.is_file():
        raise CalibrationError(f"{meta_path} is missing; pass a directory written by `polykv calibrate`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{meta_path} is not valid JSON ({exc}); re-run `polykv calibrate`") from None
    missing = [k for k in METADATA_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CalibrationError(f"{meta_path} lacks {', '.join(missing)}; re-run `polykv calibrate`")
    try:
        check_fingerprint(meta["fingerprint"])
    except PlanError as exc:
        raise CalibrationError(f"{meta_path}: {exc}") from None
    if not fingerprint_hash_matches(meta["fingerprint"], meta["fingerprint_hash"]):
        raise CalibrationError(
            f"{meta_path}: fingerprint_hash {meta['fingerprint_hash']} does not match its fingerprint "
            f"({fingerprint_hash(meta['fingerprint'])}); the file was edited, re-run `polykv calibrate`"
        )
    return meta


def check_curves_model(curves: pd.DataFrame, meta: dict, where: str) -> None:
    """CalibrationError unless every curve row carries metadata's model fingerprint."""
    expected = meta["fingerprint_hash"]
    found = sorted(curves["fingerprint"].dropna().astype(str).unique())
    others = [f for f in found if f != expected]
    if others:
        models = sorted(curves.loc[curves["fingerprint"].isin(others), "model"].astype(str).unique())
        raise CalibrationError(
            f"{where} holds curves of another model ({', '.join(models)}, fingerprint {', '.join(others)}) "
            f"than metadata.json ({meta['model']}, fingerprint {expected}); keep one model per calibration directory"
        )


def _unreadable(curves_dir: Path, exc: Exception) -> CalibrationError:
    """Name the corrupt part file when one can be found, and how to redo it."""
    import pyarrow.parquet as pq

    for part in sorted(curves_dir.rglob("*.parquet")):
        try:
            pq.read_metadata(part)
        except Exception as part_exc:
            reason = (str(part_exc).splitlines() or [type(part_exc).__name__])[0]
            return CalibrationError(
                f"{part} is not a readable Parquet file ({reason}); delete it and run the same "
                "`polykv calibrate` command again to redo that sample"
            )
    reason = (str(exc).splitlines() or [type(exc).__name__])[0]
    return CalibrationError(f"cannot read Parquet under {curves_dir} ({reason}); re-run `polykv calibrate`")


def load_calibration(path: str | Path) -> Calibration:
    """Load DIR/metadata.json and DIR/curves; CalibrationError on missing parts or mixed models."""
    path = Path(path)
    if not path.is_dir():
        raise CalibrationError(f"calibration directory {path} does not exist; run `polykv calibrate` first")
    meta = read_metadata(path)
    curves_dir = path / "curves"
    if not curves_dir.is_dir() or not any(curves_dir.rglob("*.parquet")):
        raise CalibrationError(f"{curves_dir} has no Parquet files; re-run `polykv calibrate`")
    try:
        curves = pd.read_parquet(curves_dir)
    except Exception as exc:  # pyarrow raises several types for unreadable data
        raise _unreadable(curves_dir, exc) from None
    missing = [c for c in CURVE_COLUMNS if c not in curves.columns]
    if missing:
        raise CalibrationError(f"{curves_dir} lacks column(s) {', '.join(missing)}; re-run `polykv calibrate`")
    check_curves_model(curves, meta, str(curves_dir))
    expected = meta.get("sample_ids")
    if isinstance(expected, list):
        have = set(curves["sample_id"].astype(str))
        absent = [str(s) for s in expected if str(s) not in have]
        if absent:
            raise CalibrationError(
                f"{path} is incomplete: {len(absent)} of {len(expected)} samples have no curves (first: {absent[0]}); "
                "run the same `polykv calibrate` command again to redo them"
            )
    return Calibration(path, meta, curves, hash_parquet(curves_dir))
