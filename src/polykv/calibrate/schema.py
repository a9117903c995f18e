"""The calibration output: a directory with two Parquet datasets in tidy long format, and metadata.

    DIR/run.json          settings of the run (written first; a resumed run must match it)
    DIR/curves/part-NNNNN.parquet       one file per sample: sensitivity curves
    DIR/statistics/part-NNNNN.parquet   one file per sample: attention statistics
    DIR/metadata.json     written last: model, fingerprint, data hash, settings, timings (its presence = complete)

Both tables share one schema (version `SCHEMA_VERSION`): model, fingerprint (12-hex hash of the model fingerprint),
sample_id, category, layer, head (null = whole layer), policy and budget (null for statistics), metric, value.
Curve metrics: `proxy_err` (relative attention-output error, lower is better), `proxy_mass` (share of the answer
queries' attention mass kept, higher is better), `e2e_dnll` (rise in answer NLL, nats/token), `e2e_kl`
(KL(full || compressed) per answer token), and with `--measure scaled` `ref_e2e_kl` / `ref_proxy_err`: e2e KL and
proxy error at a few reference options only (see `polykv.calibrate.runner.REFERENCE_OPTIONS`), from which `solve`
scales each layer's proxy curve (metric `proxy_scaled`), and `uniform_e2e_kl` on rows with layer -1: the e2e KL
with EVERY layer compressed by one (policy, budget), budgets below the prompt length only, from which `solve`
anchors each policy's scaled curves to whole-model measurements (metric `proxy_anchored`). Statistics metrics: see
`polykv.calibrate.statistics`.

A calibration measured at several KV precisions (`calibrate --bits`) has one more curve column, `bits` (after
`budget`: 16, 8, 4 or 2, the precision the layer's kept keys and values were read at; reference rows are at 16),
`CURVES_WITH_BITS`; one measured at 16 bits only has no such column, and readers take its rows as 16 bits.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("fingerprint", pa.string()),
        ("sample_id", pa.string()),
        ("category", pa.string()),
        ("layer", pa.int32()),
        ("head", pa.int32()),
        ("policy", pa.string()),
        ("budget", pa.int32()),
        ("metric", pa.string()),
        ("value", pa.float64()),
    ],
    metadata={"polykv_schema_version": str(SCHEMA_VERSION)},
)

#: the curves of a calibration at several precisions: SCHEMA with `bits` after `budget`
CURVES_WITH_BITS = SCHEMA.insert(SCHEMA.get_field_index("budget") + 1, pa.field("bits", pa.int32()))

CURVE_METRICS = {
    "proxy": ("proxy_err", "proxy_mass"),
    "e2e": ("e2e_dnll", "e2e_kl"),
    "scaled": ("proxy_err", "proxy_mass", "ref_e2e_kl", "ref_proxy_err", "uniform_e2e_kl"),
}


def table(rows: dict[str, list]) -> pa.Table:
    """The rows as a table of `SCHEMA`, or of `CURVES_WITH_BITS` when they have a `bits` column."""
    return pa.Table.from_pydict(rows, schema=CURVES_WITH_BITS if "bits" in rows else SCHEMA)
