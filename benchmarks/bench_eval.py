"""The eval engine's cost per instance on the bundled SmolLM2: capture, compression and decode, by batching choice.

One shipped instance (default: passkey-000), the default methods (full, every uniform policy, pyramid, the
checked-in plans) at budgets 64-512. Prints a Markdown section: machine, load, command, and the seconds of
  the capture (one full-cache prefill recording what every policy needs) and the compression of every configuration,
  decoding all configurations as one shared-prefix batch (the engine's path, `polykv.shared_prefix`), and as stacked
  copies: with `evaluate.batching.partition` (the fallback), in one batch, in one batch per budget (median of
  --repeats),
  one attention call of the ragged decode batch: grouped by KV head (the engine's path) vs sdpa after repeat_kv.
Run: python benchmarks/bench_eval.py [--threads 2] [--repeats 2] [--task passkey]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch


def timed(fn, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--task", default="passkey")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import polykv.evaluate.suite as suite
    from polykv.cache import stack
    from polykv.capture import capture
    from polykv.evaluate.batching import partition
    from polykv.evaluate.engine import Job, weight_tokens
    from polykv.evaluate.methods import parse_methods
    from polykv.evaluate.tasks import load_tasks
    from polykv.generation import eos_ids, greedy
    from polykv.kernels.reference import masked_decode_attention
    from polykv.models import fingerprint, load_model
    from polykv.prompts import encode
    from polykv.shared_prefix import shared_batch

    loaded = load_model("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    inst = load_tasks(Path(suite.__file__).parent / "data" / f"{args.task}.jsonl")[0][0]
    methods = parse_methods("full,uniform:*,pyramid,plan", Path("plans/smollm2-135m"))
    fp = fingerprint(model.config)
    jobs = [Job(m.name, b, m.settings(b, fp)) for m in methods for b in m.budgets([64, 128, 256, 512])]
    prompt = encode(tok, inst.context, inst.question, max_tokens=4096)
    state: dict = {}

    def do_capture() -> None:
        state["cap"] = capture(model, prompt.ids, window=64, cumulative=True)

    def do_compress() -> None:
        cap = state["cap"]
        state["comp"] = [cap.compress(j.settings or [None] * cap.num_layers) for j in jobs]

    t_capture = timed(do_capture, args.repeats)
    t_compress = timed(do_compress, args.repeats)
    cap, comp = state["cap"], state["comp"]
    eos, new = eos_ids(tok, model), inst.max_new_tokens or 24
    widths = [[layer.kept_tokens for layer in c.layers] for c in comp]

    def decode(groups: list[list[int]]) -> None:
        for g in groups:
            greedy(model, stack([comp[i] for i in g], slack=new), cap.last_logits.expand(len(g), -1), new, eos)

    by_budget: dict = {}
    for i, j in enumerate(jobs):
        by_budget.setdefault(j.budget, []).append(i)
    chosen = partition(widths, weight_tokens(model, cap.cache), 64, 60_000 * cap.num_layers)
    decodes = {
        f"partition ({'+'.join(str(len(g)) for g in chosen)} rows)": chosen,
        "one batch": [list(range(len(jobs)))],
        "one batch per budget": list(by_budget.values()),
        "batches of 16 by total width (before cost-based batching)": [
            order[i : i + 16]
            for order in [sorted(range(len(jobs)), key=lambda j: sum(widths[j]))]
            for i in range(0, len(jobs), 16)
        ],
    }
    t_decode = {
        "shared-prefix batch of all rows (the engine)": timed(
            lambda: greedy(model, shared_batch(cap.cache, comp, new), cap.last_logits.expand(len(comp), -1), new, eos),
            args.repeats,
        )
    }
    t_decode.update(
        {f"stacked, {name}": timed(lambda g=groups: decode(g), args.repeats) for name, groups in decodes.items()}
    )

    # one attention call of a ragged decode batch: 36 rows, SmolLM2's heads, ~700 keys, 20 % padding
    gen = torch.Generator().manual_seed(0)
    rows, kv, groups, keys, dim = 36, 3, 3, 700, 64
    q = torch.randn(rows, kv * groups, dim, generator=gen)
    k, v = torch.randn(rows, kv, keys, dim, generator=gen), torch.randn(rows, kv, keys, dim, generator=gen)
    visible = torch.rand(rows, 1, keys, generator=gen) > 0.2

    def repeated() -> None:
        kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=visible[:, :, None])

    t_grouped = timed(lambda: [masked_decode_attention(q, k, v, visible, dim**-0.5) for _ in range(20)], 3) / 20
    t_repeated = timed(lambda: [repeated() for _ in range(20)], 3) / 20

    load = os.getloadavg()[0]
    print("## Eval engine, one instance (benchmarks/bench_eval.py)")
    print(
        f"- command: `{shlex.join([sys.executable.split('/')[-1]] + sys.argv)}`; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, 1-min load {load:.1f} on {os.cpu_count()} cores"
    )
    print(f"- instance {inst.id}: {prompt.length} prompt tokens, {len(jobs)} configurations, up to {new} new tokens")
    print("\n| step | seconds |\n|---|---|")
    print(f"| capture (full prefill + observations) | {t_capture:.2f} |")
    print(f"| compress all configurations | {t_compress:.2f} |")
    for name, t in t_decode.items():
        print(f"| decode, {name} | {t:.2f} |")
    print(f"| one ragged decode attention call, grouped by KV head | {t_grouped * 1000:.1f} ms |")
    print(f"| the same after repeat_kv, sdpa with the mask | {t_repeated * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
