"""Prompt building: one place for calibrate, run and eval, so they all see the same token layout.

A prompt is split into a *context* part and a *question* part (whose last tokens open the answer). Both modes use
the same two token runs: question-aware compression prefills both and compresses; context-only compression
prefills the context, compresses, then feeds the question as a chunk (the prefix-caching case).
The model's chat template is used when it has one (the question and context go in one user turn); otherwise a
plain "context / Question: / Answer:" template.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from polykv.errors import InputError

#: How a prompt is compressed: `query-aware` prefills context and question together, then compresses (the question
#: steers attention-based policies); `context-only` prefills and compresses the context alone, then feeds the
#: question as a chunk (the prefix-caching case).
MODES = ("query-aware", "context-only")

_SENTINEL = "\u2063POLYKV_QUESTION\u2063"


@dataclass(frozen=True)
class PromptIds:
    """Token ids of the two parts, (1, n) each; `ids` is both joined."""

    context: Tensor
    question: Tensor

    @property
    def ids(self) -> Tensor:
        return torch.cat([self.context, self.question], dim=1)

    @property
    def length(self) -> int:
        return self.context.shape[1] + self.question.shape[1]


def render(tokenizer, context: str, question: str | None) -> tuple[str, str, bool]:
    """(context text, question text, uses_chat_template): the prompt split just before the question."""
    question = (question or "").strip()
    if getattr(tokenizer, "chat_template", None):
        content = f"{context}\n\n{_SENTINEL}" if context else _SENTINEL
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        head, tail = text.split(_SENTINEL)
        return head, question + tail, True
    if not question:
        return context, "", False
    return f"{context}\n\n", f"Question: {question}\nAnswer:", False


def encode(tokenizer, context: str, question: str | None = None, max_tokens: int | None = None) -> PromptIds:
    """Tokenize a prompt; `max_tokens` truncates the context (from its middle, as LongBench does) to fit."""
    if not context.strip() and not (question or "").strip():
        raise InputError("the prompt is empty; pass --prompt TEXT or --prompt-file with some text")
    head, tail, chat = render(tokenizer, context, question)
    ctx = tokenizer(head, add_special_tokens=not chat, return_tensors="pt").input_ids
    q = tokenizer(tail, add_special_tokens=False, return_tensors="pt").input_ids
    if max_tokens is not None and ctx.shape[1] + q.shape[1] > max_tokens:
        room = max_tokens - q.shape[1]
        if room < 8:
            raise InputError(f"the question alone takes {q.shape[1]} tokens, more than --max-context {max_tokens}")
        half = room // 2
        ctx = torch.cat([ctx[:, :half], ctx[:, ctx.shape[1] - (room - half) :]], dim=1)
    return PromptIds(context=ctx, question=q)


def check_fits(model, length: int, max_new_tokens: int) -> None:
    """Refuse prompts longer than the model's context window, with the numbers."""
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit and length + max_new_tokens > limit:
        raise InputError(
            f"the prompt has {length} tokens (+{max_new_tokens} to generate) but the model's context is {limit}; "
            "shorten the prompt or pass --max-context"
        )
