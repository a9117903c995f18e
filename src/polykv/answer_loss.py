"""The whole-model answer loss of plans: every layer compressed at once, measured on prepared samples.

Each sample is prefilled once (`prepare_samples`, as `calibrate` does); a plan's loss on it is KL(full cache ||
plan) on the teacher-forced answer. Many plans share one batched answer forward per sample: each plan is one row
of a shared-prefix cache (`polykv.shared_prefix`) holding only the columns that plan keeps. `polykv refine` searches
on this loss and the guard of `polykv solve` judges candidate plans with it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from polykv.attention import polykv_attention
from polykv.calibrate.sample import PreparedSample
from polykv.calibrate.sensitivity import answer_losses
from polykv.compat import with_cache
from polykv.policies import make_policy
from polykv.settings import LayerSetting
from polykv.shared_prefix import from_kept

Choice = tuple[str, int]  # (policy, budget) of one layer


class Objective:
    """Mean KL (full cache || plan) over the samples' teacher-forced answers, for many plans at once."""

    def __init__(self, model: nn.Module, samples: list[PreparedSample], max_rows: int = 48):
        self.model, self.samples, self.max_rows = model, samples, max_rows
        self._kept: list[dict[tuple[int, str, int], torch.Tensor | None]] = [{} for _ in samples]
        self.evaluated = 0

    def _kept_columns(self, s: int, layer: int, choice: Choice) -> torch.Tensor | None:
        policy, budget = choice
        key = (layer, policy, budget)
        memo = self._kept[s]
        if key not in memo:
            sample = self.samples[s]
            if policy == "full" or budget >= sample.prompt_tokens:
                memo[key] = None
            else:
                obs = sample.capture.observation(layer)
                memo[key] = LayerSetting(make_policy(policy), budget).kept_indices(obs)[0]
        return memo[key]

    def __call__(self, plans: list[list[Choice]]) -> np.ndarray:
        """The mean over samples of each plan's answer KL."""
        return self.per_sample(plans).mean(0)

    def per_sample(self, plans: list[list[Choice]]) -> np.ndarray:
        """(samples, plans): each sample's answer KL under each plan."""
        return self.per_sample_losses(plans)["kl"]

    @torch.no_grad()
    def per_sample_losses(self, plans: list[list[Choice]]) -> dict[str, np.ndarray]:
        """(samples, plans) per loss: `kl`, KL(full cache || plan) on the teacher-forced answer, and `nll`, the rise
        of the gold answer's mean NLL over the full cache's (what the plan costs the right answer itself)."""
        kl = np.zeros((len(self.samples), len(plans)))
        nll = np.zeros_like(kl)
        with polykv_attention(self.model):
            for s, sample in enumerate(self.samples):
                for start in range(0, len(plans), self.max_rows):
                    group = plans[start : start + self.max_rows]
                    kept = [[self._kept_columns(s, layer, c) for layer, c in enumerate(p)] for p in group]
                    cache = from_kept(sample.capture.cache, kept, slack=sample.answer_in.shape[1])
                    inputs = sample.answer_in.expand(len(group), -1)
                    logits = self.model(input_ids=inputs, **with_cache(self.model, cache), use_cache=True).logits
                    row_nll, row_kl = answer_losses(sample, logits.float())
                    kl[s, start : start + len(group)] = row_kl.cpu().numpy()
                    nll[s, start : start + len(group)] = row_nll.cpu().numpy() - sample.full_nll
        self.evaluated += len(plans)
        return {"kl": kl, "nll": nll}


def prepare_samples(
    loaded, items: list, max_context: int | None, on_sample: Callable[[int], None] | None = None
) -> list[PreparedSample]:
    """Prefill each calibration item once (capture + teacher-forced full-cache answer), as `calibrate` does."""
    from polykv.calibrate.runner import CAPTURE_WINDOW
    from polykv.calibrate.sample import prepare

    out = []
    for i, item in enumerate(items):
        out.append(
            prepare(
                loaded.model,
                loaded.tokenizer,
                item.context,
                item.question,
                item.answers[0],
                max_context,
                CAPTURE_WINDOW,
            )
        )
        if on_sample:
            on_sample(i)
    return out
