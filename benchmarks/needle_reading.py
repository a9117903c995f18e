"""Where does the model read a needle, and which scoring keeps it there?

The measurement behind `snapkv_forward` (docs/calibration.md, "Why SnapKV loses needles on SmolLM2").

For each instance of a retrieval task (the answer must occur verbatim in the context), with the full cache and the
answer teacher-forced: per layer, the attention the best head of the answer's tokens puts on the answer's tokens in
the context ("reading layers": > --read). Then, in the reading layers, the share of those tokens each scoring keeps
at each budget (best KV head): SnapKV's centred average pooling against forward spans of several lengths.

    python benchmarks/needle_reading.py --tasks dev/ --task passkey --n 8 --budgets 128,256
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from polykv.capture import capture
from polykv.models import load_model
from polykv.policies.base import protect_last, select
from polykv.policies.scoring import pool1d, window_attention
from polykv.policies.snapkv_forward import forward_max
from polykv.prompts import encode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", type=Path, required=True, help="directory of <task>.jsonl (a development split)")
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--budgets", default="128,256")
    ap.add_argument("--spans", default="8,12,16,24")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--read", type=float, default=0.1, help="attention share that makes a layer a reading layer")
    args = ap.parse_args()
    loaded = load_model(args.model)
    tok, model = loaded.tokenizer, loaded.model
    budgets = [int(b) for b in args.budgets.split(",")]
    variants = {"snapkv (avg pool 5)": lambda s: pool1d(s, 5, "avg")}
    variants |= {f"forward span {k}": (lambda s, k=int(k): forward_max(s, k)) for k in args.spans.split(",")}
    lines = [json.loads(x) for x in (args.tasks / f"{args.task}.jsonl").read_text().splitlines() if x.strip()]
    captures = []
    layers = model.config.num_hidden_layers
    read = torch.zeros(layers)
    for row in lines[: args.n]:
        prompt = encode(tok, row["context"], row["question"])
        ids = prompt.ids[0].tolist()
        ans = tok(row["answers"][0], add_special_tokens=False).input_ids
        hits = [i for i in range(len(ids) - len(ans)) if ids[i : i + len(ans)] == ans]
        if not hits:
            print(f"{row['id']}: the answer's tokens do not occur in the prompt; skipped")
            continue
        span = list(range(hits[0], hits[0] + len(ans)))
        # teacher-force all but the last answer token: their queries are the last len(ans) - 1 window rows
        cap = capture(model, torch.tensor([ids + ans[:-1]]), window=max(64, args.window), cumulative=False)
        n_ans = max(len(ans) - 1, 1)
        for layer in range(layers):
            obs = cap.observation(layer)
            keys = obs.keys.repeat_interleave(obs.groups, dim=1).float()
            q = obs.window_queries[:, :, -n_ans:].float()
            w = torch.softmax(q @ keys.transpose(-1, -2) * obs.scaling, -1)[0]
            read[layer] += w[:, :, span].sum(-1).max(0).values.mean().item()
        # the prompt alone (no answer) is what a policy sees
        captures.append((capture(model, prompt.ids, window=max(64, args.window), cumulative=False), set(span)))
    read /= max(len(captures), 1)
    reading = [i for i in range(layers) if read[i] > args.read]
    print(f"{args.model}, {args.task}, {len(captures)} instances")
    print("attention of the answer's tokens on the needle's (best head), per layer:")
    print(" ".join(f"{i}:{read[i]:.2f}" for i in range(layers)))
    print(f"reading layers (> {args.read}): {reading}")
    print("\n| scoring | " + " | ".join(f"kept at {b}" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for name, fn in variants.items():
        kept_share = []
        for b in budgets:
            fracs = []
            for cap, span in captures:
                for layer in reading:
                    obs = cap.observation(layer)
                    scores = protect_last(fn(window_attention(obs, args.window)), min(args.window, obs.num_tokens))
                    kept = select(scores, b, obs.valid)[0]
                    fracs.append(max(len(span & set(kept[h].tolist())) for h in range(kept.shape[0])) / len(span))
            kept_share.append(sum(fracs) / max(len(fracs), 1))
        print(f"| {name} | " + " | ".join(f"{x:.0%}" for x in kept_share) + " |")


if __name__ == "__main__":
    main()
