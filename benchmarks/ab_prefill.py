"""A/B of compress-during-prefill time (`polykv.apply`, budget 256, 2048-token prompt, median of 3) between two
checkouts: `python benchmarks/ab_prefill.py <checkout root>` (run it for each; the package is imported from there).
"""

import statistics
import sys
import time

import torch

torch.set_num_threads(2)
sys.path.insert(0, sys.argv[1] + "/src")
import polykv  # noqa: E402 (from the checkout named on the command line)
from polykv.apply import apply  # noqa: E402
from polykv.models import load_model  # noqa: E402

assert polykv.__file__.startswith(sys.argv[1]), polykv.__file__
lm = load_model("smollm2-135m")
text = (__import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "passkey.txt").read_text() * 2
ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :2048]
ts = {}
for name in ("snapkv", "h2o", "streaming"):
    xs = []
    for _ in range(3):
        with apply(lm.model, (name, 256)):
            t = time.perf_counter()
            with torch.no_grad():
                lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            xs.append(time.perf_counter() - t)
    ts[name] = round(statistics.median(xs), 3)
print(sys.argv[1], ts)
