"""Running the engine over many instances: in this process, or in worker processes that share one queue.

On a CPU box a single process leaves cores idle (decode steps and Python overhead do not use every thread), so
`workers > 1` runs that many processes, each loading the model once and taking the next instance as soon as it is
free (longest prompts first, so no worker is left with a long one at the end). Threads are split between them.
On several GPUs, worker k uses `cuda:k mod device count`. Results come back as each instance finishes; the caller
checkpoints them, so a killed run resumes whichever worker computed what.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from polykv.evaluate import engine
from polykv.evaluate.methods import Method
from polykv.evaluate.tasks import TaskInstance


@dataclass(frozen=True)
class EvalJob:
    """Everything a worker needs besides the instance: which model, how loaded, what to compare."""

    model: str
    methods: tuple[Method, ...]
    budgets: tuple[int, ...]
    mode: str = "query-aware"
    max_context: int | None = None
    max_rows: int = 64
    device: str | None = None
    dtype: str | None = None


@dataclass
class Finished:
    """One evaluated instance, and its prefill-per-method check when one was asked for."""

    result: engine.InstanceResult
    check: dict | None = None


def evaluate_one(loaded, job: EvalJob, inst: TaskInstance, verify: bool) -> Finished:
    """The engine on one instance; with `verify`, also one prefill per method (equality and speed-up)."""
    methods, budgets = list(job.methods), list(job.budgets)
    res = engine.evaluate_instance(loaded, inst, methods, budgets, job.mode, job.max_context, max_rows=job.max_rows)
    if not verify:
        return Finished(res)
    slow_rows, slow_s = engine.reprefill_instance(loaded, inst, methods, budgets, job.mode, job.max_context)
    fast = {(r["method"], r["budget"]): r["prediction"] for r in res.rows}
    same = sum(fast[(r["method"], r["budget"])] == r["prediction"] for r in slow_rows)
    return Finished(
        res,
        {
            "instance": inst.id,
            "engine_s": res.prefill_s + res.decode_s,
            "reprefill_s": slow_s,
            "same_predictions": same,
            "configurations": len(slow_rows),
        },
    )


def _load(job: EvalJob, device: str | None = None):
    from polykv.models import load_model

    return load_model(job.model, device=device or job.device, dtype=job.dtype)


_STATE: dict = {}


def _init_worker(job: EvalJob, threads: int, counter) -> None:
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    torch.set_num_threads(threads)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    _STATE["job"], _STATE["loaded"] = job, _load(job, worker_device(job.device, index, gpus))


def worker_device(requested: str | None, index: int, gpus: int) -> str | None:
    """Worker `index`'s device: spread over the GPUs when none (or plain "cuda") was named; else as requested."""
    if requested in (None, "cuda") and gpus > 1:
        return f"cuda:{index % gpus}"
    return requested


def _work(item: tuple[TaskInstance, bool]) -> Finished:
    return evaluate_one(_STATE["loaded"], _STATE["job"], *item)


def run_instances(
    job: EvalJob,
    instances: list[TaskInstance],
    verify: set[tuple[str, str]] | None = None,
    workers: int = 1,
    loaded=None,
) -> Iterator[Finished]:
    """Evaluate `instances`, yielding each as it finishes (in completion order when `workers > 1`).

    `verify` holds the (task, id) of instances to re-run with one prefill per method. `loaded` reuses a model already in
    this process (single-process runs only). The threads of this process (`torch.get_num_threads()`) are split
    evenly between the workers, at least one each.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    verify = verify or set()
    if not instances:  # e.g. a resumed run with nothing left: no model to load
        return
    if workers == 1 or len(instances) == 1:
        loaded = loaded or _load(job)
        for inst in instances:
            yield evaluate_one(loaded, job, inst, (inst.task, inst.id) in verify)
        return
    threads = max(1, torch.get_num_threads() // workers)
    ctx = mp.get_context("spawn")  # fork would copy this process's thread pools and model; spawn starts clean
    counter = ctx.Value("i", 0)
    order = sorted(instances, key=lambda i: len(i.context) + len(i.question), reverse=True)
    with ctx.Pool(min(workers, len(instances)), _init_worker, (job, threads, counter)) as pool:
        yield from pool.imap_unordered(_work, [(i, (i.task, i.id) in verify) for i in order], chunksize=1)
