"""The whole-model answer loss of plans: every layer compressed at once, measured on prepared samples.

Each sample is prefilled once (`prepare_samples`, as `calibrate` does); a plan's loss on it is KL(full cache ||
plan) on the teacher-forced answer. Many plans share one batched answer forward per sample: each plan is one row
of a shared-prefix cache (`polykv.shared_prefix`) holding only the columns that plan keeps. `polykv refine` searches
on this loss and the guard of `polykv solve` judges candidate plans with it.

A plan with a layer below 16 bits (KV precision) cannot share the prefix: that layer's kept keys and values are
what its quantised storage hands to attention, not the prompt's. Such plans are compressed for real
(`Capture.compress`, which quantises what each layer keeps as `polykv.apply` does), read back dequantized and
stacked into batches of their own (`polykv.cache.stack`), so their loss is that of the cache a run would decode
from. The answer tokens stay at the model's dtype, as decoded tokens do in the storage until a group of them fills
(as in calibration, `polykv.calibrate.sensitivity`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from polykv.attention import polykv_attention
from polykv.cache import PolyKVCache, dequantized, stack
from polykv.calibrate.sample import PreparedSample
from polykv.calibrate.sensitivity import answer_losses
from polykv.compat import with_cache
from polykv.policies import make_policy
from polykv.precision import FULL_PRECISION
from polykv.settings import LayerSetting
from polykv.shared_prefix import from_kept

#: (policy, budget) or (policy, budget, bits) of one layer; without bits the layer is at 16 (the model's dtype)
Choice = tuple[str, int] | tuple[str, int, int]


def choice_bits(choice: Choice) -> int:
    """The KV precision of `choice`: its third item, or 16 when it has none."""
    return int(choice[2]) if len(choice) > 2 else FULL_PRECISION


def quantized(plan: list[Choice]) -> bool:
    """Whether some layer of `plan` is below 16 bits (then it is measured from a real compressed cache)."""
    return any(choice_bits(c) != FULL_PRECISION for c in plan)


def setting(choice: Choice) -> LayerSetting | None:
    """The layer setting `Capture.compress` applies for `choice`, as a plan's settings give it
    (`polykv.settings.from_plan`); None: `full` at 16 bits, the layer whole."""
    policy, budget, bits = choice[0], choice[1], choice_bits(choice)
    if policy == "full" and bits == FULL_PRECISION:
        return None
    return LayerSetting(make_policy(policy), max(1, budget) if policy == "full" else budget, bits)


class Objective:
    """Mean KL (full cache || plan) over the samples' teacher-forced answers, for many plans at once."""

    def __init__(
        self, model: nn.Module, samples: list[PreparedSample], max_rows: int = 48, quantized_rows: int = 8
    ) -> None:
        """`max_rows` plans per shared-prefix forward; `quantized_rows` plans with layers below 16 bits per stacked
        forward (each row holds its own copy of every kept key and value)."""
        self.model, self.samples, self.max_rows, self.quantized_rows = model, samples, max_rows, quantized_rows
        self._kept: list[dict[tuple[int, str, int], torch.Tensor | None]] = [{} for _ in samples]
        self.evaluated = 0

    def _kept_columns(self, s: int, layer: int, choice: Choice) -> torch.Tensor | None:
        policy, budget = choice[:2]
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

    def _shared_batch(self, s: int, group: list[list[Choice]]) -> PolyKVCache:
        """One shared-prefix row per plan (every layer at 16 bits)."""
        sample = self.samples[s]
        kept = [[self._kept_columns(s, layer, c) for layer, c in enumerate(p)] for p in group]
        return from_kept(sample.capture.cache, kept, slack=sample.answer_in.shape[1])

    def _stacked_batch(self, s: int, group: list[list[Choice]]) -> PolyKVCache:
        """One stacked row per plan, each compressed (and quantised) for real and read back as attention reads it."""
        capture = self.samples[s].capture
        rows = [dequantized(capture.compress([setting(c) for c in p])) for p in group]
        return stack(rows, slack=self.samples[s].answer_in.shape[1])

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
        positions before its first wrong argmax: up to there, teacher forcing is the plan's own greedy decoding).

        Plans whose layers are all at 16 bits are rows of shared-prefix batches; the others rows of stacked
        batches of real compressed caches (module doc)."""
        kl = np.zeros((len(self.samples), len(plans)))
        nll = np.zeros_like(kl)
        miss = np.zeros_like(kl)
        shared = [i for i, p in enumerate(plans) if not quantized(p)]
        stacked = [i for i, p in enumerate(plans) if quantized(p)]
        batches = [(self._shared_batch, shared[i : i + self.max_rows]) for i in range(0, len(shared), self.max_rows)]
        step = self.quantized_rows
        batches += [(self._stacked_batch, stacked[i : i + step]) for i in range(0, len(stacked), step)]
        with polykv_attention(self.model):
            for s, sample in enumerate(self.samples):
                for build, columns in batches:
                    cache = build(s, [plans[i] for i in columns])
                    inputs = sample.answer_in.expand(len(columns), -1)
                    logits = self.model(input_ids=inputs, **with_cache(self.model, cache), use_cache=True).logits
                    row_nll, row_kl = answer_losses(sample, logits.float())
                    kl[s, columns] = row_kl.cpu().numpy()
                    nll[s, columns] = row_nll.cpu().numpy() - sample.full_nll
                    miss[s, columns] = missed_share(logits, sample.targets).cpu().numpy()
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
