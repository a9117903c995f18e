"""One calibration sample, prefilled once: the capture, the teacher-forced answer and its full-cache baseline.

The answer is teacher-forced as a chunk after the prompt: the first answer token is predicted by the prefill itself
(compression happens after the prefill, so it cannot change it); the chunk [a1 .. am] predicts [a2 .. am, EOS].
The answer is the sample's gold answer, or (`answer=None`) what the model itself generates greedily with the full
cache: a compressed cache that reproduces that continuation answers as the full cache does, whatever the gold is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polykv.attention import polykv_attention
from polykv.capture import Capture, capture
from polykv.compat import with_cache
from polykv.errors import InputError
from polykv.generation import eos_ids, greedy
from polykv.prompts import check_fits, encode

#: Tokens the full cache generates for a sample prepared on its own answer: eval's default answer length.
GREEDY_TOKENS = 24


@dataclass
class PreparedSample:
    capture: Capture
    answer_in: Tensor  # (1, m) the teacher-forced chunk
    targets: Tensor  # (1, m) what each chunk position should predict
    full_logprobs: Tensor  # (m, V) fp32, under the full cache
    full_nll: float
    answer_queries: dict[int, Tensor]  # layer -> (1, Hq, m, D)
    answer_keys: dict[int, tuple[Tensor, Tensor]]  # layer -> keys, values of prompt + answer (1, Hkv, T+m, D)

    @property
    def prompt_tokens(self) -> int:
        return self.capture.cache.layers[0].seen


@torch.no_grad()
def prepare(
    model: nn.Module,
    tokenizer,
    context: str,
    question: str,
    answer: str | None,
    max_context: int | None,
    window: int,
    greedy_tokens: int = GREEDY_TOKENS,
) -> PreparedSample:
    """Prefill the prompt once (recording every layer), then teacher-force the answer over the full cache.

    `answer=None` teacher-forces the full cache's own greedy continuation (up to `greedy_tokens` tokens and its
    EOS) instead of a gold answer."""
    prompt = encode(tokenizer, context, question, max_tokens=max_context)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    if answer is not None:
        ans = tokenizer(answer.strip(), add_special_tokens=False, return_tensors="pt").input_ids
        if ans.shape[1] == 0:
            raise InputError("a calibration sample has an empty answer; every sample needs a non-empty answers[0]")
        check_fits(model, prompt.length, ans.shape[1])
    else:
        check_fits(model, prompt.length, greedy_tokens + 1)
    cap = capture(model, prompt.ids.to(device), window=window, cumulative=True)
    if answer is None:
        ans, last = own_answer(model, cap, greedy_tokens + 1, eos_ids(tokenizer, model) or {eos})
        targets = torch.cat([ans[:, 1:], last], dim=1).to(device)
    else:
        targets = torch.cat([ans[:, 1:], torch.tensor([[eos]])], dim=1).to(device)
    full = cap.uncompressed()
    full.observer = cap.observer
    cap.observer.chunk_queries.clear()
    with polykv_attention(model):
        logits = model(input_ids=ans.to(device), **with_cache(model, full), use_cache=True).logits[0].float()
    full.observer = None
    logprobs = torch.log_softmax(logits, dim=-1)
    nll = float(-logprobs.gather(-1, targets[0, :, None]).mean())
    return PreparedSample(
        capture=cap,
        answer_in=ans.to(device),
        targets=targets,
        full_logprobs=logprobs,
        full_nll=nll,
        answer_queries=dict(cap.observer.chunk_queries),
        answer_keys={i: (layer.keys, layer.values) for i, layer in enumerate(full.layers)},
    )


def own_answer(model: nn.Module, cap: Capture, max_tokens: int, eos: set[int]) -> tuple[Tensor, Tensor]:
    """The full cache's greedy continuation of the captured prompt, split into the teacher-forced chunk (1, m) and
    the token its last position predicts (1, 1): up to `max_tokens` tokens, cut after the first EOS.

    A continuation that is EOS at once still gives a one-token chunk (EOS predicting EOS)."""
    tokens = greedy(model, cap.uncompressed(), cap.last_logits, max_tokens, eos)[0].cpu()
    stop = next((i for i, t in enumerate(tokens.tolist()) if t in eos), None)
    if stop is not None:
        tokens = tokens[: stop + 1]
    if len(tokens) < 2:
        tokens = torch.cat([tokens, tokens[-1:]])
    return tokens[None, :-1], tokens[None, -1:]
