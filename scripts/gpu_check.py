"""`make gpu-check`: PolyKV's GPU path on the local CUDA GPU in one pass, ending in one summary table.

Checks, each pass / fail / skip with a reason:
- kernel tests: tests/test_kernels.py on CUDA (it picks CUDA whenever there is one), split by dtype: fp32 (with
  the references and the dispatcher), fp16, bf16;
- kernel compile: every Triton kernel compiled ahead of time for this GPU in fp32, fp16 and bf16 (head dim 128,
  GQA group 4, the launchers' blocks; 4-bit codes for the quantized decode kernels) and loaded onto it, which
  checks shared memory and thread limits;
- quantized decode: tests/test_quantized_decode.py on CUDA, then per bit width (8, 4, 2) the quantized decode
  kernel against its torch reference on one layer-sized store (`QUANT_SHAPE`, bf16) with the median times of the
  kernel, of the unquantized flash-decoding kernel on the same tokens dequantized, and of the torch reference;
- run triton vs torch: `polykv run --json` with plans/smollm2-135m/avg128.json on the bundled smollm2-135m in bf16,
  once with POLYKV_KERNELS=triton and once with torch: same greedy answer and the same kv_bytes;
- decode: greedy decode tokens/s and peak GPU memory (torch.cuda.max_memory_allocated over prefill + decode,
  weights included) for the full cache vs the plan at 2k and 8k context on the Triton path; a context beyond the
  model's window is cut to what it leaves room for, and the row says so.
Exit status 0 only if every check passes, else 1; 2 without a CUDA GPU (one line on stderr).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
PLAN = ROOT / "plans" / MODEL / "avg128.json"
PROMPT = ROOT / "examples" / "passkey.txt"
QUESTION = "What is the passkey for the archive? Answer with the passkey only."
#: pytest -k expression per dtype over tests/test_kernels.py (test names and ids spell the 16-bit dtype)
KERNEL_TESTS = {"fp32": "not fp16 and not bf16", "fp16": "fp16", "bf16": "bf16"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CONTEXTS = (2048, 8192)
#: (B, Hkv, G, D, N) of the quantized decode timing: a Llama-3-8B layer at 8k tokens, batch 4
QUANT_SHAPE = (4, 8, 4, 128, 8192)
QUANT_TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
DECODE_TOKENS = 64
BUDGET_S = 450  # everything after `make install` within 8 minutes, with room for the model load
NO_GPU = "gpu-check: no CUDA GPU available (torch.cuda.is_available() is False); run it on a machine with one"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "pass" | "fail" | "skip"
    detail: str


def summary(checks: list[Check]) -> str:
    """One Markdown table (check, status, detail) and a line counting the statuses."""
    lines = ["| check | status | detail |", "| --- | --- | --- |"]
    for c in checks:
        detail = " ".join(c.detail.split()).replace("|", "\\|")
        lines.append(f"| {c.name} | {c.status.upper()} | {detail} |")
    counts = {s: sum(c.status == s for c in checks) for s in ("pass", "fail", "skip")}
    lines.append(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    return "\n".join(lines)


def exit_status(checks: list[Check]) -> int:
    """0 only if there are checks and every one passed."""
    return 0 if checks and all(c.status == "pass" for c in checks) else 1


def pytest_check(name: str, returncode: int, output: str) -> Check:
    """A check from one `pytest -q` run: fail on any failure, skip if anything was skipped, else pass."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last)}
    tally = ", ".join(f"{n} {word}" for word, n in counts.items()) or last[-200:] or f"pytest exit {returncode}"
    if returncode == 5:
        return Check(name, "fail", "no test selected")
    if returncode != 0 or counts.get("failed") or counts.get("error") or counts.get("errors"):
        failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        return Check(name, "fail", "; ".join([tally, *failed[:3]]))
    if counts.get("skipped"):
        reasons = [line.split(": ", 1)[-1] for line in lines if line.startswith("SKIPPED")]
        return Check(name, "skip", "; ".join([tally, *reasons[:1]]))
    return Check(name, "pass", tally)


def compare_runs(triton: dict, reference: dict) -> Check:
    """`polykv run --json` on the Triton path vs the torch path: same answer and kv_bytes, each on its backend."""
    name = "run triton vs torch"
    fast, slow = triton.get("kernels") or {}, reference.get("kernels") or {}  # what served each path
    if "triton" not in fast.get("decode", "") or any("triton" in impl for impl in slow.values()):
        return Check(name, "fail", f"paths served: triton run {fast}, torch run {slow}")
    if triton["text"] != reference["text"]:
        return Check(name, "fail", f"answers differ: triton {triton['text']!r}, torch {reference['text']!r}")
    if triton["kv_bytes"] != reference["kv_bytes"]:
        return Check(name, "fail", f"kv_bytes differ: triton {triton['kv_bytes']}, torch {reference['kv_bytes']}")
    share = 100 * triton["kv_bytes"] / max(triton["kv_bytes_full"], 1)
    return Check(
        name,
        "pass",
        f"answer {triton['text']!r}; kv_bytes {triton['kv_bytes']} ({share:.1f}% of full) on both; "
        f"{triton['prompt_tokens']} prompt tokens; decode {triton['decode_s']:.2f} s triton, "
        f"{reference['decode_s']:.2f} s torch",
    )


def contexts(limit: int | None, decode_tokens: int, wanted: tuple[int, ...] = CONTEXTS) -> list[tuple[str, int, str]]:
    """(name, prompt tokens, note) per wanted context; one the model cannot hold with `decode_tokens` more is cut
    to what it can, and the note says so."""
    out = []
    for n in wanted:
        name = f"{n // 1024}k" if n % 1024 == 0 else str(n)
        room = n if limit is None else min(n, limit - decode_tokens)
        note = f"; {name} cut to {room}: the model's context is {limit}, +{decode_tokens} decoded" if room < n else ""
        out.append((name, room, note))
    return out


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1][:200] if text else ''}"


class Deadline:
    """Seconds left of the time budget, for subprocess timeouts."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def log(msg: str) -> None:
    print(f"gpu-check: {msg}", file=sys.stderr, flush=True)


def gpu_env(**extra: str) -> dict[str, str]:
    """The environment for subprocesses: compiled kernels (no interpreter), offline, quiet."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def bf16_reason() -> str | None:
    """Why this GPU cannot run the bf16 checks (the kernels' bf16 dots need sm_80+), or None."""
    major, minor = torch.cuda.get_device_capability()
    return None if major >= 8 else f"sm_{major}{minor} has no bf16 tensor cores (needs sm_80+)"


def kernel_tests(deadline: Deadline) -> list[Check]:
    checks = []
    for dtype, expr in KERNEL_TESTS.items():
        name = f"kernel tests {dtype}"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", "-k", expr]
        cmd.append("tests/test_kernels.py")
        log(f"{name} ...")
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=gpu_env(), capture_output=True, text=True, timeout=max(deadline.left(), 1)
            )
        except subprocess.TimeoutExpired:
            checks.append(Check(name, "fail", "timed out (time budget used up)"))
            continue
        checks.append(pytest_check(name, proc.returncode, proc.stdout + proc.stderr))
    return checks


def kernel_compiles() -> list[Check]:
    from polykv.kernels import triton_kernels as tk
    from polykv.kernels import triton_quantized as tq

    major, minor = torch.cuda.get_device_capability()
    dtypes = [d for d in DTYPES if d != "bf16" or bf16_reason() is None]
    checks = []
    for kernel, compile_kernel in [(k, m.compile_kernel) for m in (tk, tq) for k in m.KERNELS]:
        log(f"compile {kernel} ...")
        done = []
        try:
            for dtype in dtypes:
                compiled = compile_kernel(kernel, DTYPES[dtype])
                compiled.run  # noqa: B018 - loads it onto this GPU: raises if shared memory or threads exceed it
                spills = getattr(compiled, "n_spills", "?")
                done.append(f"{dtype} {compiled.metadata.shared / 1024:.1f} KiB shared, {spills} spills")
        except Exception as exc:  # noqa: BLE001 - any compiler error is this kernel's failure
            checks.append(Check(f"compile {kernel}", "fail", f"{dtype}: {one_line(exc)}"))
            continue
        skipped = "" if "bf16" in dtypes else f"; bf16 skipped: {bf16_reason()}"
        checks.append(Check(f"compile {kernel}", "pass", f"sm_{major}{minor}: " + "; ".join(done) + skipped))
    return checks


def cuda_ms(fn: Callable[[], object], reps: int = 20) -> float:
    """Median milliseconds of `fn` on the GPU over `reps` CUDA-event timings, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def quantized_decode_timing(
    shape: tuple[int, ...] = QUANT_SHAPE, device: str = "cuda", timer: Callable[[Callable[[], object]], float] = cuda_ms
) -> list[Check]:
    """Per bit width: the quantized decode kernel vs its torch reference (error, then times) on `shape`."""
    from polykv.kernels import quantized_reference as qref
    from polykv.kernels import triton_kernels as tk
    from polykv.kernels import triton_quantized as tq
    from polykv.quantized_tokens import QuantizedTokens

    dtype = torch.float16 if bf16_reason() else torch.bfloat16
    batch, kv_heads, groups, dim, tokens = shape
    gen = torch.Generator(device=device).manual_seed(0)
    keys, values = (torch.randn(batch, kv_heads, tokens, dim, generator=gen, device=device) for _ in range(2))
    q = torch.randn(batch, kv_heads * groups, 1, dim, generator=gen, device=device).to(dtype)
    lengths = torch.full((batch, kv_heads), tokens, dtype=torch.int32, device=device)
    scaling = dim**-0.5
    checks = []
    for bits in (8, 4, 2):
        name = f"quantized decode {bits}-bit"
        log(f"{name} ...")
        try:
            store = QuantizedTokens(bits, 32).append(keys.to(dtype), values.to(dtype))
            got = tq.quantized_decode_attention(q, store, scaling)
            want = qref.quantized_decode_attention(q, store, scaling)
            err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
            k_full, v_full = qref.stored_tokens(store)
            kernel_ms = timer(lambda s=store: tq.quantized_decode_attention(q, s, scaling))
            full_ms = timer(lambda k=k_full, v=v_full: tk.decode_attention(q[:, :, 0], k, v, lengths, scaling))
            torch_ms = timer(lambda s=store: qref.quantized_decode_attention(q, s, scaling))
        except Exception as exc:  # noqa: BLE001 - e.g. out of resources: this row fails, the others still run
            checks.append(Check(name, "fail", one_line(exc)))
            continue
        gbps = store.nbytes / (kernel_ms * 1e6)
        detail = (
            f"{str(dtype)[6:]} B={batch} Hkv={kv_heads} G={groups} D={dim} N={tokens}: max rel err {err:.1e} "
            f"(tol {QUANT_TOL[dtype]:.0e}); {kernel_ms:.3f} ms ({store.nbytes / 2**20:.1f} MiB, {gbps:.0f} GB/s), "
            f"unquantized kernel {full_ms:.3f} ms, torch reference {torch_ms:.3f} ms"
        )
        checks.append(Check(name, "pass" if err <= QUANT_TOL[dtype] else "fail", detail))
    return checks


def quantized_decode_checks(deadline: Deadline) -> list[Check]:
    """tests/test_quantized_decode.py on CUDA (bf16 left out where the GPU lacks it), then the timing rows."""
    name = "quantized decode tests"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow"]
    cmd += ["-k", "not bf16"] if bf16_reason() else []
    log(f"{name} ...")
    try:
        proc = subprocess.run(
            [*cmd, "tests/test_quantized_decode.py"],
            cwd=ROOT,
            env=gpu_env(),
            capture_output=True,
            text=True,
            timeout=max(deadline.left(), 1),
        )
        checks = [pytest_check(name, proc.returncode, proc.stdout + proc.stderr)]
    except subprocess.TimeoutExpired:
        checks = [Check(name, "fail", "timed out (time budget used up)")]
    return checks + quantized_decode_timing()


def polykv_run(kernels: str, deadline: Deadline) -> dict:
    """`polykv run --json` (as `python -m polykv_cli`) with the checked-in plan, on one kernel backend."""
    cmd = [sys.executable, "-m", "polykv_cli", "run", "--model", MODEL, "--plan", str(PLAN)]
    cmd += ["--prompt-file", str(PROMPT), "--question", QUESTION, "--max-new-tokens", "12"]
    cmd += ["--device", "cuda", "--dtype", "bf16", "--json"]
    env = gpu_env(POLYKV_KERNELS=kernels)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(deadline.left(), 1))
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()
        raise RuntimeError(f"polykv run ({kernels}) exited {proc.returncode}: {tail[-1] if tail else ''}")
    return json.loads(proc.stdout)


def run_comparison(deadline: Deadline) -> list[Check]:
    if reason := bf16_reason():
        return [Check("run triton vs torch", "skip", reason)]
    log("polykv run, triton and torch ...")
    return [compare_runs(polykv_run("triton", deadline), polykv_run("torch", deadline))]


@torch.no_grad()
def decode_speed(loaded, settings: list, ids: torch.Tensor, new_tokens: int) -> tuple[float, int, int]:
    """(greedy decode tokens/s after a compressed prefill, peak bytes allocated over both, KV bytes kept)."""
    from polykv.apply import apply
    from polykv.compat import output_cache
    from polykv.generation import greedy

    model = loaded.model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with apply(model, settings):
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    kv_bytes = cache.stats().kv_bytes
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = greedy(model, cache, out.logits[:, -1, :], new_tokens)
    torch.cuda.synchronize()
    rate = (tokens.shape[1] - 1) / (time.perf_counter() - start)
    return rate, torch.cuda.max_memory_allocated(), kv_bytes


def decode_benchmark() -> list[Check]:
    if reason := bf16_reason():
        return [Check("decode", "skip", reason)]
    from polykv.apply import resolve_settings
    from polykv.models import load_model
    from polykv.settings import uniform

    os.environ["POLYKV_KERNELS"] = "triton"
    loaded = load_model(MODEL, device="cuda", dtype="bf16")
    config = loaded.model.config.get_text_config(decoder=True)
    methods = {"full": uniform("full", 1, config.num_hidden_layers), "plan": resolve_settings(loaded.model, PLAN)}
    text_ids = loaded.tokenizer(PROMPT.read_text(), add_special_tokens=False).input_ids
    wanted = contexts(getattr(config, "max_position_embeddings", None), DECODE_TOKENS)
    longest = max(n for _, n, _ in wanted)
    ids = torch.tensor([(text_ids * (longest // len(text_ids) + 1))[:longest]], device="cuda")
    for settings in methods.values():  # compile the kernels' variants before anything is timed
        decode_speed(loaded, settings, ids[:, :512], 32)
    checks = []
    mib = 1 / 2**20
    for context, n, note in wanted:
        for method, settings in methods.items():
            name = f"decode {method} {context}"
            log(f"{name} ...")
            try:
                rate, peak, kv = decode_speed(loaded, settings, ids[:, :n], DECODE_TOKENS)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: this row fails, the others still run
                checks.append(Check(name, "fail", one_line(exc)))
                continue
            detail = f"{rate:.1f} tok/s, peak {peak * mib:.0f} MiB, KV {kv * mib:.1f} MiB; {n} prompt tokens{note}"
            checks.append(Check(name, "pass", detail))
    return checks


def guarded(name: str, step: Callable[[], list[Check]], deadline: Deadline) -> list[Check]:
    """Run one group of checks; an exception or a spent time budget becomes one failed row."""
    if deadline.left() <= 0:
        return [Check(name, "fail", "not run: the time budget was used up")]
    try:
        return step()
    except Exception as exc:  # noqa: BLE001 - every check must reach the table
        return [Check(name, "fail", one_line(exc))]


def main() -> int:
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)  # before polykv's kernels are imported: compiled, not interpreted
    deadline = Deadline(BUDGET_S)
    checks = guarded("kernel tests", lambda: kernel_tests(deadline), deadline)
    checks += guarded("kernel compile", kernel_compiles, deadline)
    checks += guarded("quantized decode", lambda: quantized_decode_checks(deadline), deadline)
    checks += guarded("run triton vs torch", lambda: run_comparison(deadline), deadline)
    checks += guarded("decode", decode_benchmark, deadline)
    import triton

    props = torch.cuda.get_device_properties(0)
    print(
        f"# PolyKV gpu-check on {props.name} (sm_{props.major}{props.minor}), torch {torch.__version__}, "
        f"triton {triton.__version__}\n"
    )
    print(summary(checks))
    return exit_status(checks)


if __name__ == "__main__":
    sys.exit(main())
