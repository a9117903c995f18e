"""Does plain transformers, given only `polykv export --to hf-config`, answer exactly as `polykv run` of the plan?

Three steps: export the plan's config overrides (the library half of `polykv export`); run the plan with `polykv run`'s
library half (`polykv.run.run`); then, in a child process that never imports polykv, load the model with
`from_pretrained(MODEL_DIR, **from_pretrained_kwargs)` and decode greedily from the same prompt token ids with its
own cache. The greedy answers must be equal (exit 0), else the first differing token is named (exit 1).

    python benchmarks/verify_hf_export.py --plan plans/qwen2.5-coder-0.5b/target-hf/avg256.json \\
        --model qwen2.5-coder-0.5b --prompt-file notes.txt --question "What is the key?"

`--model` is what `polykv run` loads; `--model-dir` the Hugging Face directory the child loads (default: `--model`
when it is a directory, else the dequantized copy polykv keeps of a bundled model, under `polykv.models.cache_root()`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

#: the child: plain transformers, greedy decoding with the model's own cache (never imports polykv)
CHILD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
job = json.load(sys.stdin)
torch.set_num_threads(job["threads"])
model = AutoModelForCausalLM.from_pretrained(
    job["model_dir"], dtype=torch.float32, attn_implementation="sdpa", **job["kwargs"]
).eval()
ids, cache, tokens = torch.tensor([job["ids"]]), None, []
with torch.no_grad():
    for _ in range(job["max_new_tokens"]):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        if token in job["eos"]:
            break
        ids = torch.tensor([[token]])
config = model.config.get_text_config()
print(json.dumps({
    "tokens": tokens,
    "layer_types": list(config.layer_types),
    "sliding_window": config.sliding_window,
    "polykv_imported": any(m == "polykv" or m.startswith("polykv.") for m in sys.modules),
}))
"""


@dataclass
class Verdict:
    polykv_text: str
    transformers_text: str
    layer_types: list[str]
    sliding_window: int | None

    @property
    def equal(self) -> bool:
        return self.polykv_text == self.transformers_text


def model_dir(model: str, explicit: str | None) -> Path:
    """The Hugging Face directory the child loads."""
    from polykv.models import ALIASES, cache_root

    if explicit:
        return Path(explicit)
    if Path(model).is_dir():
        return Path(model)
    if model in ALIASES:
        return cache_root() / "dequantized" / model.replace("/", "--")
    raise SystemExit(f"pass --model-dir: {model} is neither a directory nor a bundled alias")


def plain_transformers(job: dict) -> dict:
    """Run CHILD on `job` in a fresh interpreter; its JSON answer."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD], input=json.dumps(job), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"the plain-transformers process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def verify(
    plan: Path,
    model: str,
    context: str,
    question: str | None,
    max_new_tokens: int = 32,
    directory: str | None = None,
    overrides: dict | None = None,
    threads: int = 2,
) -> Verdict:
    """Both answers for `plan`; `overrides` replaces the exported ones (to check that a wrong config is caught)."""
    from polykv.export import export_plan
    from polykv.generation import decode_text, eos_ids
    from polykv.models import load_model
    from polykv.prompts import encode
    from polykv.run import run
    from polykv.settings import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        export_plan(plan, "hf-config", Path(tmp) / "hf.json")
        exported = json.loads((Path(tmp) / "hf.json").read_text())["from_pretrained_kwargs"]
    loaded = load_model(model, attn_implementation="sdpa")
    settings = load_settings(plan, loaded.model.config.num_hidden_layers, loaded.fingerprint)
    ours = run(loaded, settings, context, question, max_new_tokens).text
    eos = sorted(eos_ids(loaded.tokenizer, loaded.model))
    ids = encode(loaded.tokenizer, context, question).ids[0].tolist()
    job = {
        "model_dir": str(model_dir(model, directory)),
        "kwargs": exported if overrides is None else overrides,
        "ids": ids,
        "max_new_tokens": max_new_tokens,
        "eos": eos,
        "threads": threads,
    }
    answer = plain_transformers(job)
    if answer["polykv_imported"]:
        raise SystemExit("the plain-transformers process imported polykv; the check is void")
    import torch

    theirs = decode_text(loaded.tokenizer, torch.tensor([answer["tokens"]]), set(eos))[0]
    return Verdict(ours, theirs, answer["layer_types"], answer["sliding_window"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", required=True, type=Path)
    ap.add_argument("--model", required=True, help="What polykv run loads (alias, directory, .gguf).")
    ap.add_argument("--model-dir", default=None, help="The Hugging Face directory plain transformers loads.")
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--prompt-file", type=Path, default=None)
    ap.add_argument("--question", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    context = args.prompt_file.read_text(encoding="utf-8") if args.prompt_file else args.prompt
    if context is None:
        raise SystemExit("pass --prompt or --prompt-file")
    v = verify(args.plan, args.model, context, args.question, args.max_new_tokens, args.model_dir)
    sliding = sum(t == "sliding_attention" for t in v.layer_types)
    print(f"transformers loaded {sliding} of {len(v.layer_types)} layers sliding, window {v.sliding_window}")
    print(f"polykv run:   {v.polykv_text!r}")
    print(f"transformers: {v.transformers_text!r}")
    if not v.equal:
        pairs = zip(v.polykv_text, v.transformers_text, strict=False)
        at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(v.polykv_text), len(v.transformers_text)))
        print(f"DIFFERENT (first at character {at})")
        raise SystemExit(1)
    print("equal")


if __name__ == "__main__":
    main()
