"""Behaviour on the bundled SmolLM2-135M: a passkey in ~2k tokens of real prose (runs in CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from polykv.run import run
from polykv.settings import uniform

pytestmark = pytest.mark.bundled

CONTEXT = (Path(__file__).parents[1] / "examples" / "passkey.txt").read_text()
QUESTION = "What is the passkey for the archive? Answer with the passkey only."


@pytest.mark.parametrize("policy,budget,found", [("full", 1, True), ("snapkv", 128, True), ("streaming", 64, False)])
def test_passkey(smollm2, policy, budget, found):
    result = run(smollm2, uniform(policy, budget, 30), CONTEXT, QUESTION, max_new_tokens=12)
    assert 1500 < result.prompt_tokens < 2500
    assert ("pineapple" in result.text.lower()) is found, result.text
    if policy != "full":
        # the tokens are really gone: every layer holds exactly the budget
        assert result.kept_tokens == [budget] * 30
        assert result.kv_bytes * result.prompt_tokens == pytest.approx(result.kv_bytes_full * budget)


def test_context_only_mode_runs_and_accounts(smollm2):
    result = run(smollm2, uniform("snapkv", 256, 30), CONTEXT, QUESTION, max_new_tokens=4, mode="context-only")
    assert result.kept_tokens == [256] * 30
    assert result.mode == "context-only"
