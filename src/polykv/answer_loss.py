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
        """(samples, plans) per loss: `kl`, KL(full cache || plan) on the teacher-forced answer; `nll`, the rise
        of the answer's mean NLL over the full cache's (what the plan costs the answer itself); `miss`, the share
        of the answer that greedy decoding under the plan does not reproduce (one minus the teacher-forced
        positions before its first wrong argmax: up to there, teacher forcing is the plan's own greedy decoding)."""
        kl = np.zeros((len(self.samples), len(plans)))
        nll = np.zeros_like(kl)
        miss = np.zeros_like(kl)
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
                    miss[s, start : start + len(group)] = missed_share(logits, sample.targets).cpu().numpy()
        self.evaluated += len(plans)
        return {"kl": kl, "nll": nll, "miss": miss}


def missed_share(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row of (rows, m, V) teacher-forced logits: the share of the m targets from the first position whose
    argmax is not the target on (0 when every position's argmax is its target)."""
    wrong = logits.argmax(-1) != targets.expand(len(logits), -1)
    m = wrong.shape[1]
    first = torch.where(wrong.any(-1), wrong.float().argmax(-1), torch.full_like(wrong[:, 0], m, dtype=torch.long))
    return (m - first).float() / m


def prepare_samples(
    loaded,
    items: list,
    max_context: int | None,
    on_sample: Callable[[int], None] | None = None,
    own_answers: bool = False,
) -> list[PreparedSample]:
    """Prefill each calibration item once (capture + teacher-forced full-cache answer), as `calibrate` does; with
    `own_answers`, the answer is the full cache's own greedy continuation instead of the item's gold answer."""
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
                None if own_answers else item.answers[0],
                max_context,
                CAPTURE_WINDOW,
            )
        )
        if on_sample:
            on_sample(i)
    return out
