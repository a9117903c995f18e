"""The calibration loop: one prefill per sample, curves and statistics to Parquet, resumable after any crash.

Each sample's rows are written as one Parquet part per table, atomically (temp file + rename), statistics first
and curves last; a sample counts as done when its curves part exists. A run killed at any point and started again
with the same settings skips the done samples, removes the temporary files the kill left and redoes the rest, so
its output equals an uninterrupted run (the computation is deterministic for a given machine, model and settings).
`metadata.json` is written last.

With `bits` (KV precisions) beyond 16, every (policy, budget) is also measured with the layer's kept keys and values
read at each width (`polykv.calibrate.sensitivity`), from the same prefill; the curves then gain a `bits` column
(`polykv.calibrate.schema.CURVES_WITH_BITS`). Measured at 16 bits only, the output is what it was before KV precision
existed, byte for byte: no `bits` column, no `bits` setting.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from polykv.calibrate.sample import PreparedSample, prepare
from polykv.calibrate.schema import CURVE_METRICS, SCHEMA_VERSION, table
from polykv.calibrate.sensitivity import Option, e2e_losses, proxy_losses, uniform_losses
from polykv.calibrate.statistics import layer_statistics
from polykv.errors import CalibrationError, InputError, PolyKVError
from polykv.io import atomic_write, atomic_write_json, maybe_crash, remove_stale_temps
from polykv.models import LoadedModel, fingerprint
from polykv.plan import fingerprint_hash, polykv_version
from polykv.policies import make_policy, policy_names
from polykv.precision import FULL_PRECISION, supported, unsupported_message
from polykv.settings import LayerSetting

MEASURES = ("proxy", "e2e", "both", "scaled")
CAPTURE_WINDOW = 64
#: `--measure scaled`: the options at which each layer's e2e KL is measured to put its proxy curve on the scale of
#: the model's output (two generic heavy evictions: recency only, and query-aware). 2 answer forwards per layer
#: instead of one per option: ~+65 % over a `proxy` sample on SmolLM2 (BENCHMARKS.md), against ~25x for `e2e`.
REFERENCE_OPTIONS = (("streaming", 64), ("snapkv", 64))
#: the `layer` of whole-model rows: `uniform_e2e_kl` is measured with every layer compressed by one option
ALL_LAYERS = -1


@dataclass(frozen=True)
class CalibrationConfig:
    """Everything that determines a calibration's output (stored in run.json and metadata.json)."""

    policies: tuple[str, ...] = tuple(policy_names())
    budgets: tuple[int, ...] | None = None  # None: 16, 32, 64, ... up to the longest prompt
    measure: str = "scaled"  # proxy curves + per-layer e2e scale: the best plans on held-out tasks (BENCHMARKS.md)
    max_context: int | None = 4096
    e2e_batch: int = 8
    #: KV precisions each option is measured at (16: the model's dtype), widest first
    bits: tuple[int, ...] = (FULL_PRECISION,)

    @property
    def precision(self) -> bool:
        """Whether some width below 16 bits is measured (then the curves carry a `bits` column)."""
        return any(b != FULL_PRECISION for b in self.bits)

    def describe(self) -> dict:
        """The settings as stored in run.json; `bits` only when some width below 16 is measured."""
        out = asdict(self)
        if not self.precision:
            del out["bits"]
        return out

    def check(self) -> None:
        if self.measure not in MEASURES:
            raise InputError(f"unknown --measure {self.measure!r}; use proxy, e2e, both or scaled")
        unknown = [p for p in self.policies if p not in policy_names()]
        if unknown:
            raise InputError(f"unknown policies {', '.join(unknown)}; known: {', '.join(policy_names())}")
        if self.budgets is not None and (not self.budgets or min(self.budgets) < 1):
            raise InputError("--budgets must be positive integers, e.g. 16,32,64")
        if not self.bits:
            raise InputError("--bits needs at least one width, e.g. 16,4")
        for bits in self.bits:
            if not supported(bits):
                raise InputError(f"--bits: {unsupported_message(bits)}")
        if len(set(self.bits)) != len(self.bits):
            raise InputError(f"--bits lists a width twice: {','.join(map(str, self.bits))}")


def budget_grid(limit: int, budgets: tuple[int, ...] | None) -> list[int]:
    """The configured budgets, or powers of two from 16 up to the first one >= `limit` (everything kept).

    `limit` is --max-context when set, so every sample shares one grid (shorter samples keep everything at the
    top budgets, a loss of exactly 0) and the solver finds every option for every sample.
    """
    if budgets is not None:
        return sorted(set(budgets))
    grid, b = [], 16
    while True:
        grid.append(b)
        if b >= limit:
            return grid
        b *= 2


@dataclass
class SampleResult:
    sample_id: str
    prompt_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)


def calibration_options(config: CalibrationConfig, prompt_tokens: int) -> list[Option]:
    """Every (policy, budget, bits) option a sample of `prompt_tokens` tokens is measured at, per layer. `full`
    is measured at 16 bits only: the solver never prices it as an option (`polykv.solve.aggregate`)."""
    opts = []
    for name in config.policies:
        policy = make_policy(name)
        for b in budget_grid(config.max_context or prompt_tokens, config.budgets):
            for bits in config.bits:
                if bits == FULL_PRECISION or name != "full":
                    opts.append(Option(name, b, LayerSetting(policy, b, bits)))
    return opts


def measure_sample(
    model, prepared: PreparedSample, config: CalibrationConfig, tick: Callable[[int], None] | None = None
):
    """Curve rows (layer, head, policy, budget, bits, metric, value) and statistics rows (layer, head, policy,
    budget, metric, value) as tuples for one prepared sample, and the seconds each part took."""
    options = calibration_options(config, prepared.prompt_tokens)
    curves, stats, seconds = [], [], {"proxy": 0.0, "e2e": 0.0, "statistics": 0.0}
    for layer in range(prepared.capture.num_layers):
        t = time.perf_counter()
        for head, metric, value in layer_statistics(prepared, layer):
            stats.append((layer, head, None, None, metric, value))
        seconds["statistics"] += time.perf_counter() - t
        if config.measure in ("proxy", "both", "scaled"):
            t = time.perf_counter()
            for opt, (err, mass) in zip(options, proxy_losses(prepared, layer, options), strict=True):
                curves.append((layer, None, opt.policy, opt.budget, opt.bits, "proxy_err", err))
                curves.append((layer, None, opt.policy, opt.budget, opt.bits, "proxy_mass", mass))
            seconds["proxy"] += time.perf_counter() - t
        if config.measure in ("e2e", "both"):
            t = time.perf_counter()
            for opt, (dnll, kl) in zip(
                options, e2e_losses(model, prepared, layer, options, config.e2e_batch), strict=True
            ):
                curves.append((layer, None, opt.policy, opt.budget, opt.bits, "e2e_dnll", dnll))
                curves.append((layer, None, opt.policy, opt.budget, opt.bits, "e2e_kl", kl))
            seconds["e2e"] += time.perf_counter() - t
        if config.measure == "scaled":
            t = time.perf_counter()
            refs = [Option(name, b, LayerSetting(make_policy(name), b)) for name, b in REFERENCE_OPTIONS]
            for opt, (_, kl), (err, _) in zip(
                refs,
                e2e_losses(model, prepared, layer, refs, config.e2e_batch),
                proxy_losses(prepared, layer, refs),
                strict=True,
            ):
                curves.append((layer, None, opt.policy, opt.budget, opt.bits, "ref_e2e_kl", kl))
                curves.append((layer, None, opt.policy, opt.budget, opt.bits, "ref_proxy_err", err))
            seconds["e2e"] += time.perf_counter() - t
        if tick:
            tick(len(options))
    if config.measure == "scaled":
        t = time.perf_counter()
        anchors = [o for o in options if o.budget < prepared.prompt_tokens]
        for opt, kl in zip(anchors, uniform_losses(model, prepared, anchors, config.e2e_batch), strict=True):
            curves.append((ALL_LAYERS, None, opt.policy, opt.budget, opt.bits, "uniform_e2e_kl", kl))
        seconds["uniform"] = time.perf_counter() - t
    return curves, stats, seconds


STAT_COLUMNS = ("layer", "head", "policy", "budget", "metric", "value")
CURVE_COLUMNS = ("layer", "head", "policy", "budget", "bits", "metric", "value")


def _without_bits(rows: list[tuple]) -> list[tuple]:
    """Curve rows as a calibration at 16 bits only writes them: without the `bits` value."""
    return [row[:4] + row[5:] for row in rows]


def _rows(model_name: str, fp_hash: str, sample, rows: list[tuple], cols: tuple[str, ...]) -> dict[str, list]:
    out: dict[str, list] = {"model": [], "fingerprint": [], "sample_id": [], "category": []}
    out.update({c: [] for c in cols})
    for row in rows:
        out["model"].append(model_name)
        out["fingerprint"].append(fp_hash)
        out["sample_id"].append(sample.id)
        out["category"].append(sample.category)
        for c, v in zip(cols, row, strict=True):
            out[c].append(v)
    return out


def _write_parquet(path: Path, data: dict[str, list]) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table(data), tmp, compression="zstd"))


def _check_resume(out: Path, run_info: dict, overwrite: bool) -> None:
    run_json = out / "run.json"
    if run_json.exists() and not overwrite:
        try:
            previous = json.loads(run_json.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CalibrationError(f"{run_json} is corrupt; remove {out} or pass --overwrite to start again") from None
        if previous != run_info:
            changed = sorted(k for k in set(previous) | set(run_info) if previous.get(k) != run_info.get(k))
            if changed == ["settings"]:
                old, new = previous["settings"], run_info["settings"]
                changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise CalibrationError(
                f"{out} holds a calibration with other settings ({', '.join(changed)} differ); "
                "use another --out, or --overwrite to replace it"
            )
    elif run_json.exists() and overwrite:
        for sub in ("curves", "statistics"):
            for part in (out / sub).glob("part-*.parquet"):
                part.unlink()
        (out / "metadata.json").unlink(missing_ok=True)


def _set_up(out: Path, run_info: dict, overwrite: bool) -> None:
    """Rank 0, before any sample: create `out`, check it holds nothing else, drop a killed run's temp files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CalibrationError(f"cannot create --out {out} ({exc.strerror}); choose a writable directory") from None
    _check_resume(out, run_info, overwrite)
    for sub in (out, out / "curves", out / "statistics"):
        remove_stale_temps(sub)
    atomic_write_json(out / "run.json", run_info)


@torch.no_grad()
def calibrate(
    loaded: LoadedModel,
    samples: list,
    config: CalibrationConfig,
    out: str | Path,
    data_hash: str,
    overwrite: bool = False,
    on_sample: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    rank: int = 0,
    world: int = 1,
    sync: Callable[[Any], list] | None = None,
) -> dict:
    """Calibrate `samples` into `out`; returns the metadata dict. Resumes a matching unfinished run.

    With world > 1 (torch.distributed), rank r does samples r, r + world, ...; rank 0 checks `out` and writes
    run.json first, and metadata.json (`finish`) once every part exists. `sync(obj)` must return every rank's
    `obj` (a barrier, e.g. `Dist.gather_objects`): the other ranks wait on it until rank 0 has set `out` up, and
    fail with rank 0's error if it could not.
    """
    config.check()
    if not samples:
        raise InputError("no calibration samples; pass --data with a non-empty JSONL file")
    out = Path(out)
    fp = fingerprint(loaded.model.config)
    fp_hash = fingerprint_hash(fp)
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    run_info = {
        "schema_version": SCHEMA_VERSION,
        "model": loaded.name,
        "fingerprint": fp,
        "dtype": dtype,
        "data_hash": data_hash,
        "sample_ids": [s.id for s in samples],
        "settings": {
            **config.describe(),
            "capture_window": CAPTURE_WINDOW,
            "policy_params": {name: make_policy(name).params() for name in config.policies},
        },
    }
    run_info = json.loads(json.dumps(run_info))  # the form it has once saved (tuples become lists)
    setup_error: PolyKVError | None = None
    if rank == 0:
        try:
            _set_up(out, run_info, overwrite)
        except PolyKVError as exc:
            setup_error = exc
    if world > 1:
        if sync is None:
            raise ValueError("calibrate with world > 1 needs `sync` to wait for rank 0's set-up")
        first = sync(None if setup_error is None else str(setup_error))[0]
        if first is not None and setup_error is None:
            raise CalibrationError(first)
    if setup_error is not None:
        raise setup_error
    timings: dict[str, dict] = {}
    started = time.perf_counter()
    for index, sample in enumerate(samples):
        if index % world != rank:
            continue
        part = f"part-{index:05d}.parquet"
        if (out / "curves" / part).exists():
            if on_sample:
                on_sample(index, 0)
            continue
        t0 = time.perf_counter()
        prepared = prepare(
            loaded.model,
            loaded.tokenizer,
            sample.context,
            sample.question,
            sample.answers[0],
            config.max_context,
            CAPTURE_WINDOW,
        )
        t1 = time.perf_counter()
        if on_sample:
            on_sample(index, len(calibration_options(config, prepared.prompt_tokens)) * prepared.capture.num_layers)
        curves, stats, seconds = measure_sample(loaded.model, prepared, config, on_progress)
        _write_parquet(out / "statistics" / part, _rows(loaded.name, fp_hash, sample, stats, STAT_COLUMNS))
        maybe_crash(f"between-parts:{index}")
        if config.precision:
            curve_rows = _rows(loaded.name, fp_hash, sample, curves, CURVE_COLUMNS)
        else:
            curve_rows = _rows(loaded.name, fp_hash, sample, _without_bits(curves), STAT_COLUMNS)
        _write_parquet(out / "curves" / part, curve_rows)
        maybe_crash(f"after-sample:{index}")
        timings[sample.id] = {"prompt_tokens": prepared.prompt_tokens, "prefill_s": t1 - t0, **seconds}
        del prepared
    meta = {
        **run_info,
        "fingerprint_hash": fp_hash,
        "polykv_version": polykv_version(),
        "curve_metrics": list(
            dict.fromkeys(
                m
                for k, ms in CURVE_METRICS.items()
                if config.measure == k or (config.measure == "both" and k != "scaled")
                for m in ms
            )
        ),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "timings": {"this_process_s": time.perf_counter() - started, "per_sample": timings},
    }
    return meta


def finish(out: str | Path, meta: dict, extra_timings: list[dict] | None = None) -> dict:
    """Write metadata.json once every sample's parts exist (rank 0, after all ranks are done)."""
    out = Path(out)
    missing = [i for i in range(len(meta["sample_ids"])) if not (out / "curves" / f"part-{i:05d}.parquet").exists()]
    if missing:
        raise CalibrationError(
            f"{len(missing)} samples have no curves yet (first: #{missing[0]}); run calibrate again to resume"
        )
    for t in extra_timings or []:
        meta["timings"]["per_sample"].update(t)
    atomic_write_json(out / "metadata.json", meta)
    return meta
