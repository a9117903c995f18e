"""Policy parity with kvpress 0.5.5: do PolyKV's uniform baselines keep what the reference implementation keeps?

For every policy kvpress also implements (streaming, knorm, snapkv, tova, h2o = ObservedAttention,
expected_attention), on identical token ids and the same dequantized SmolLM2-135M weights (float32):

1. Kept indices per layer and KV head at equal budgets, in both compression modes (query-aware: context + question
   compressed; context-only: the context alone). kvpress's side runs in its own venv
   (`benchmarks/kvpress_parity_runner.py`, which records each press's scores and repeats its top-k). Reported per
   policy and budget: exact-match % (layer x head pairs whose kept sets are identical) and mean Jaccard. Besides
   each library's defaults, rows with PolyKV's parameters set to kvpress's ("matched") and "explain" rows that
   re-aggregate PolyKV's own observation the way kvpress does (not PolyKV policies) show where the rest comes from.
2. Optionally (`--answers N`), greedy answers on N instances of each of `--tasks` of the shipped suite at one budget,
   in both modes, scored with the suite's metric on both sides.

    .venv/bin/python benchmarks/kvpress_parity.py --kvpress-python /work/kvpress-venv/bin/python \\
        --budgets 64,256 --answers 5 --out benchmarks/results/kvpress-policy-parity

Writes `parity.json` (every number) and `tables.md` (the tables) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from polykv.capture import capture
from polykv.evaluate.tasks import TaskInstance, load_tasks, score
from polykv.generation import decode_text, eos_ids
from polykv.models import cache_root, load_model
from polykv.policies import LayerObservation, make_policy, ranking, select
from polykv.policies.scoring import window_attention
from polykv.prompts import encode
from polykv.settings import LayerSetting

HERE = Path(__file__).resolve().parent
SUITE = HERE.parent / "src" / "polykv" / "evaluate" / "suite" / "data"


@dataclass(frozen=True)
class Row:
    """One comparison: a PolyKV policy (or an explanatory re-scoring) against one kvpress press run."""

    policy: str  # the policy family (table)
    variant: str  # defaults | matched | explain
    polykv: str  # what PolyKV side computes, as shown in the table
    params: dict  # PolyKV policy params (ignored for explain rows)
    press: str  # kvpress label, the key of its run
    explain: str | None = None  # name of an explanatory re-scoring


#: kvpress runs: label -> (PolyKV name of the press, its params)
PRESS_RUNS = {
    "StreamingLLMPress()": ("streaming", {}),
    "KnormPress()": ("knorm", {}),
    "SnapKVPress()": ("snapkv", {}),
    "SnapKVPress(window_size=32)": ("snapkv", {"window_size": 32}),
    "TOVAPress()": ("tova", {}),
    "ObservedAttentionPress()": ("h2o", {}),
    "ExpectedAttentionPress()": ("expected_attention", {}),
}

ROWS = [
    Row("streaming", "defaults", "streaming(sinks=4)", {}, "StreamingLLMPress()"),
    Row("knorm", "defaults", "knorm", {}, "KnormPress()"),
    Row("snapkv", "defaults", "snapkv(window=32, kernel=5)", {}, "SnapKVPress()"),
    Row("snapkv", "matched", "snapkv(window=64)", {"window": 64}, "SnapKVPress()"),
    Row("snapkv", "matched", "snapkv(window=32)", {}, "SnapKVPress(window_size=32)"),
    Row("snapkv", "explain", "snapkv(window=64), pooling counts padding", {}, "SnapKVPress()", "snapkv_pad64"),
    Row("tova", "defaults", "tova", {}, "TOVAPress()"),
    Row("tova", "explain", "tova, mean over all query heads, last token kept", {}, "TOVAPress()", "tova_all_heads"),
    Row("h2o", "defaults", "h2o(recent_fraction=0.5)", {}, "ObservedAttentionPress()"),
    Row("h2o", "matched", "h2o(recent_fraction=0)", {"recent_fraction": 0.0}, "ObservedAttentionPress()"),
    Row("h2o", "explain", "h2o sum / queries that see the token", {}, "ObservedAttentionPress()", "h2o_mean"),
    Row("expected_attention", "defaults", "expected_attention(window=32)", {}, "ExpectedAttentionPress()"),
    Row(
        "expected_attention",
        "matched",
        "expected_attention(window=32, keep_window=false)",
        {"keep_window": False},
        "ExpectedAttentionPress()",
    ),
]


# ----------------------------------------------------------------------------------------------------------------
# Explanatory re-scorings of PolyKV's own observation, written the way kvpress aggregates (not PolyKV policies)


def snapkv_pad64(obs: LayerObservation, budget: int) -> torch.Tensor:
    """SnapKV over the last 64 queries, prefix pooled with zero padding counted (F.avg_pool1d's default)."""
    window = 64
    scores = window_attention(obs, window)
    prefix = obs.num_tokens - window
    b, h, _ = scores.shape
    flat = scores[..., :prefix].reshape(b * h, 1, prefix)
    scores[..., :prefix] = F.avg_pool1d(flat, 5, stride=1, padding=2).reshape(b, h, prefix)
    scores[..., prefix:] = float("inf")
    return scores


def tova_all_heads(obs: LayerObservation, budget: int) -> torch.Tensor:
    """The last query's attention averaged over every query head, the same for all KV heads; last token kept."""
    q = obs.window_queries[:, :, -1:].float()  # (B, Hq, 1, D)
    keys = obs.keys.float().repeat_interleave(obs.groups, dim=1)
    attn = torch.softmax(torch.matmul(q, keys.transpose(-1, -2)) * obs.scaling, dim=-1)[:, :, 0]  # (B, Hq, T)
    scores = attn.mean(dim=1, keepdim=True).expand(-1, obs.keys.shape[1], -1).clone()
    scores[..., -1] = float("inf")
    return scores


def h2o_mean(obs: LayerObservation, budget: int) -> torch.Tensor:
    """Cumulative attention divided by how many prompt queries can see each token (T - j): a mean, not a sum."""
    seen = torch.arange(obs.num_tokens, 0, -1, dtype=torch.float32, device=obs.keys.device)
    return obs.cumulative_attention / seen


EXPLAIN = {"snapkv_pad64": snapkv_pad64, "tova_all_heads": tova_all_heads, "h2o_mean": h2o_mean}


# ----------------------------------------------------------------------------------------------------------------


def polykv_kept(cap, row: Row, budget: int) -> list[torch.Tensor]:
    """(Hkv, K) kept indices per layer for one row at one budget."""
    out = []
    for i in range(cap.num_layers):
        obs = cap.observation(i)
        if row.explain is None:
            kept = LayerSetting(make_policy(row.policy, row.params), budget).kept_indices(obs)
        else:
            scores = EXPLAIN[row.explain](obs, budget)
            kept = select(scores, budget, obs.valid, ranking(scores, obs.valid))
        out.append(kept[0])
    return out


def compare(ours: list[torch.Tensor], theirs: list[list[list[int]]]) -> dict:
    """Exact-match fraction and mean Jaccard over layer x KV head kept sets, per-layer Jaccard, and the most tokens
    one (layer, head) keeps that the other side does not."""
    exact, jac, per_layer, swapped = [], [], [], 0
    for a_layer, b_layer in zip(ours, theirs, strict=True):
        lj = []
        for a, b in zip(a_layer.tolist(), b_layer, strict=True):
            sa, sb = set(a), set(b)
            exact.append(sa == sb)
            lj.append(len(sa & sb) / len(sa | sb))
            swapped = max(swapped, len(sa - sb))
        jac.extend(lj)
        per_layer.append(sum(lj) / len(lj))
    return {
        "exact": sum(exact) / len(exact),
        "jaccard": sum(jac) / len(jac),
        "min_layer_jaccard": min(per_layer),
        "max_swapped": swapped,
        "per_layer_jaccard": per_layer,
    }


def run_kvpress(python: str, request: dict, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        req, ans = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        req.write_text(json.dumps(request))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([python, str(HERE / "kvpress_parity_runner.py"), str(req), str(ans)], check=True, env=env)
        return json.loads(ans.read_text())


def kept_part(args, lm, python: str) -> tuple[list[dict], dict]:
    """Kept-index parity on one prompt in both modes."""
    inst = next(i for i in load_tasks(SUITE / f"{args.prompt_task}.jsonl")[0] if i.id == args.prompt_id)
    prompt = encode(lm.tokenizer, inst.context, inst.question, max_tokens=args.max_context)
    prompts = {"query-aware": prompt.ids, "context-only": prompt.context}
    jobs = [
        {
            "prompt": mode,
            "ids": ids[0].tolist(),
            "label": label,
            "press": press,
            "params": params,
            "budgets": args.budgets,
        }
        for mode, ids in prompts.items()
        for label, (press, params) in PRESS_RUNS.items()
    ]
    t = time.perf_counter()
    theirs = run_kvpress(python, {"model": args.model_dir, "threads": args.threads, "kept": jobs}, args.threads)
    print(f"kvpress kept indices: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    by_key = {(k["prompt"], k["label"], k["budget"]): k for k in theirs["kept"]}
    results = []
    for mode, ids in prompts.items():
        cap = capture(lm.model, ids, window=64, cumulative=True)
        for row in ROWS:
            for budget in args.budgets:
                ref = by_key[(mode, row.press, budget)]
                assert ref["n_kept"] == budget
                cmp = compare(polykv_kept(cap, row, budget), ref["layers"])
                results.append(
                    {
                        "mode": mode,
                        "tokens": ids.shape[1],
                        "policy": row.policy,
                        "variant": row.variant,
                        "polykv": row.polykv,
                        "kvpress": row.press,
                        "budget": budget,
                        "ratio": ref["ratio"],
                        **cmp,
                    }
                )
    return results, theirs["hello"]


def answers_part(args, lm, python: str) -> list[dict]:
    """Greedy answers of every policy on a slice of the suite, both modes, PolyKV vs kvpress."""
    from polykv.evaluate.engine import evaluate_instance
    from polykv.evaluate.methods import parse_methods

    policies = list(dict.fromkeys(p for _, (p, _) in PRESS_RUNS.items()))
    methods = parse_methods(",".join(["full"] + [f"uniform:{p}" for p in policies]), None)
    instances: list[TaskInstance] = []
    for task in args.tasks:
        instances += load_tasks(SUITE / f"{task}.jsonl")[0][: args.answers]
    rows, jobs = [], []
    for mode in args.modes:
        for inst in instances:
            res = evaluate_instance(lm, inst, methods, [args.answer_budget], mode=mode, default_new_tokens=24)
            for r in res.rows:
                rows.append(
                    {
                        "side": "polykv",
                        "mode": mode,
                        **{k: r[k] for k in ("instance_id", "task", "score")},
                        "policy": r["method"].removeprefix("uniform:"),
                        "prediction": r["prediction"],
                    }
                )
            prompt = encode(lm.tokenizer, inst.context, inst.question)
            for press in ["none"] + policies:
                jobs.append(
                    {
                        "id": inst.id,
                        "context": prompt.context[0].tolist(),
                        "question": prompt.question[0].tolist(),
                        "mode": mode,
                        "press": press,
                        "params": {},
                        "budget": args.answer_budget,
                        "max_new_tokens": inst.max_new_tokens or 24,
                    }
                )
    theirs = run_kvpress(python, {"model": args.model_dir, "threads": args.threads, "answers": jobs}, args.threads)
    eos = eos_ids(lm.tokenizer, lm.model)
    by_id = {i.id: i for i in instances}
    for a in theirs["answers"]:
        inst = by_id[a["id"]]
        text = decode_text(lm.tokenizer, torch.tensor([a["tokens"]]), eos)[0]
        rows.append(
            {
                "side": "kvpress",
                "mode": a["mode"],
                "instance_id": inst.id,
                "task": inst.task,
                "score": score(inst.metric, text, inst.answers),
                "policy": "full" if a["press"] == "none" else a["press"],
                "prediction": text,
            }
        )
    return rows


def tables(kept: list[dict], answers: list[dict], budget: int) -> str:
    lines = []
    for policy in dict.fromkeys(r["policy"] for r in kept):
        lines += [
            f"### {policy}",
            "",
            "| mode | PolyKV side | kvpress | budget | exact-match % | Jaccard | min layer Jaccard | max swapped |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in kept if r["policy"] == policy):
            lines.append(
                f"| {r['mode']} | {r['variant']}: `{r['polykv']}` | `{r['kvpress']}` | {r['budget']} | "
                f"{100 * r['exact']:.1f} | {r['jaccard']:.4f} | {r['min_layer_jaccard']:.4f} | {r['max_swapped']} |"
            )
        lines.append("")
    if answers:
        lines += [
            f"### Answers at budget {budget} (mean score, 0-100)",
            "",
            "| task | mode | policy | PolyKV | kvpress | same prediction |",
            "|---|---|---|---|---|---|",
        ]
        keys = dict.fromkeys((r["task"], r["mode"], r["policy"]) for r in answers)
        for task, mode, policy in keys:
            sel = [r for r in answers if (r["task"], r["mode"], r["policy"]) == (task, mode, policy)]
            ours = {r["instance_id"]: r for r in sel if r["side"] == "polykv"}
            theirs = {r["instance_id"]: r for r in sel if r["side"] == "kvpress"}
            mean = lambda d: sum(r["score"] for r in d.values()) / max(len(d), 1)  # noqa: E731
            same = sum(ours[i]["prediction"].strip() == theirs[i]["prediction"].strip() for i in ours if i in theirs)
            lines.append(f"| {task} | {mode} | {policy} | {mean(ours):.0f} | {mean(theirs):.0f} | {same}/{len(ours)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kvpress-python", required=True, help="python of a venv with kvpress==0.5.5 (transformers<5.3)")
    ap.add_argument("--budgets", default="64,256")
    ap.add_argument("--prompt-task", default="passkey")
    ap.add_argument("--prompt-id", default="passkey-000")
    ap.add_argument("--max-context", type=int, default=1536, help="prompt tokens for the kept-index comparison")
    ap.add_argument("--answers", type=int, default=0, help="instances per task for the answer comparison (0: skip)")
    ap.add_argument("--tasks", default="passkey,multikey_needles")
    ap.add_argument("--answer-budget", type=int, default=512)
    ap.add_argument("--modes", default="query-aware,context-only", help="compression modes of the answer part")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "kvpress-policy-parity")
    args = ap.parse_args()
    args.budgets = [int(b) for b in args.budgets.split(",")]
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.modes = [m for m in args.modes.split(",") if m]
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    lm = load_model("smollm2-135m", device="cpu", dtype="float32", attn_implementation="sdpa")
    args.model_dir = str(cache_root() / "dequantized" / "smollm2-135m")
    kept, hello = kept_part(args, lm, args.kvpress_python)
    answers = answers_part(args, lm, args.kvpress_python) if args.answers else []
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"kvpress_side": hello, "args": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "parity.json").write_text(json.dumps({"info": info, "kept": kept, "answers": answers}, indent=1))
    (args.out / "tables.md").write_text(tables(kept, answers, args.answer_budget))
    print(tables(kept, answers, args.answer_budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
