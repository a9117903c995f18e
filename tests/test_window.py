"""The `window` policy runs engine sliding-window semantics: windowed prefill and decode, sinks, against references."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama, tiny_loaded, tiny_qwen2
from transformers import Qwen2ForCausalLM

from polykv.apply import apply
from polykv.compat import output_cache
from polykv.generation import greedy
from polykv.policies import make_policy
from polykv.settings import LayerSetting

PROMPT, NEW = 30, 24


def window(budget: int, sinks: int = 0, width: int = 0) -> LayerSetting:
    return LayerSetting(make_policy("window", {"window": width, "sinks": sinks}), budget)


FULL = LayerSetting(make_policy("full"), 1)


def polykv_greedy(model, ids, settings, attention_mask=None):
    """(prefill last logits, greedy tokens, cache) with `settings` applied during the prefill."""
    with torch.no_grad(), apply(model, settings):
        out = model(input_ids=ids, attention_mask=attention_mask, use_cache=True)
        cache = output_cache(out)
        tokens = greedy(model, cache, out.logits[:, -1], NEW)
    return out.logits[:, -1], tokens, cache


def patch_windowed_eager(mp: pytest.MonkeyPatch, spans: dict[int, tuple[int, int]], full_rows: int = 0) -> None:
    """Make the eager llama attention mask layers of `spans` by loops: row i sees j <= i with i - j < window or
    j < sinks; rows before `full_rows` see every j <= i (a full prefill)."""
    from transformers.models.llama import modeling_llama

    eager = modeling_llama.eager_attention_forward
    masks: dict[tuple[int, int, int], torch.Tensor] = {}

    def mask_of(n: int, window: int, sinks: int) -> torch.Tensor:
        if (n, window, sinks) not in masks:
            seen = [[j <= i and (i < full_rows or i - j < window or j < sinks) for j in range(n)] for i in range(n)]
            rows = [[0.0 if ok else float("-inf") for ok in row] for row in seen]
            masks[(n, window, sinks)] = torch.tensor(rows)[None, None]
        return masks[(n, window, sinks)]

    def masked(module, query, key, value, attention_mask, **kwargs):
        n = query.shape[2]
        window, sinks = spans.get(module.layer_idx, (n + 1, 0))
        return eager(module, query, key, value, mask_of(n, window, sinks), **kwargs)

    mp.setattr(modeling_llama, "eager_attention_forward", masked)


def brute_force_greedy(model, ids, spans: dict[int, tuple[int, int]]):
    """Greedy decoding that re-runs the whole sequence every step (no cache) under `patch_windowed_eager`."""
    seq, first, tokens = ids, None, []
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        patch_windowed_eager(mp, spans)
        for step in range(NEW):
            logits = model(input_ids=seq, use_cache=False).logits[:, -1]
            first = logits if step == 0 else first
            nxt = logits.argmax(-1, keepdim=True)
            tokens.append(nxt)
            seq = torch.cat([seq, nxt], dim=1)
    return first, torch.cat(tokens, dim=1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_window_layers_match_transformers_sliding_layers(attn):
    """Window layers without sinks are exactly transformers' own `sliding_attention` layers, prefill and decode."""
    model = tiny_qwen2(attn)
    cfg = copy.deepcopy(model.config)
    cfg.use_sliding_window, cfg.sliding_window, cfg.layer_types = True, 8, ["sliding_attention", "full_attention"]
    native = Qwen2ForCausalLM(cfg).eval()
    native.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = native.generate(
            ids, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    logits, tokens, cache = polykv_greedy(model, ids, [window(8), FULL])
    torch.testing.assert_close(logits, ref.logits[0], rtol=1e-4, atol=1e-5)
    assert tokens[0].tolist() == ref.sequences[0, PROMPT:].tolist()
    # the same plan compressing only after a full prefill is not the same model
    with torch.no_grad(), apply(model, [LayerSetting(make_policy("streaming", {"sinks": 0}), 7), FULL]):
        evicted = model(input_ids=ids).logits[:, -1]
    assert not torch.allclose(evicted, ref.logits[0], rtol=1e-4, atol=1e-5)


def test_window_with_sinks_matches_brute_force():
    model = tiny_llama("eager", seed=5)
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    settings = [window(8, sinks=2), FULL, window(10)]
    logits, tokens, cache = polykv_greedy(model, ids, settings)
    ref_logits, ref_tokens = brute_force_greedy(model, ids, {0: (6, 2), 2: (10, 0)})
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert tokens.tolist() == ref_tokens.tolist()


def test_window_sinks_are_each_rows_first_real_tokens():
    """A left-padded batch gives every row what it gets alone (sinks are counted from a row's first real token)."""
    model = tiny_llama("eager", seed=5)
    gen = torch.Generator().manual_seed(4)
    rows = [torch.randint(5, 128, (1, n), generator=gen) for n in (PROMPT, PROMPT - 9)]
    ids = torch.zeros(2, PROMPT, dtype=torch.long)
    mask = torch.zeros(2, PROMPT, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, PROMPT - row.shape[1] :], mask[r, PROMPT - row.shape[1] :] = row[0], 1
    settings = [window(7, sinks=3), window(9, sinks=1, width=8), FULL]
    logits, tokens, _ = polykv_greedy(model, ids, settings, mask)
    for r, row in enumerate(rows):
        ref_logits, ref_tokens = brute_force_greedy(model, row, {0: (4, 3), 1: (8, 1)})
        torch.testing.assert_close(logits[r : r + 1], ref_logits, rtol=1e-4, atol=1e-5)
        assert tokens[r].tolist() == ref_tokens[0].tolist()


def test_spanned_layer_drops_what_falls_behind_its_window(monkeypatch):
    import polykv.cache

    monkeypatch.setattr(polykv.cache, "SPAN_SLACK", 2)
    model = tiny_llama("eager", seed=5)
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    settings = [window(8, sinks=2), FULL, window(10)]
    _, tokens, cache = polykv_greedy(model, ids, settings)
    _, ref_tokens = brute_force_greedy(model, ids, {0: (6, 2), 2: (10, 0)})
    assert tokens.tolist() == ref_tokens.tolist()
    first = cache.layers[0]
    assert first.kept_tokens <= 2 + 6 + 2  # sinks, the window and the slack
    assert first.columns[0, 0, :2].tolist() == [0, 1]  # the sinks stay
    assert cache.layers[2].kept_tokens <= 10 + 2


def test_window_budget_and_parameters_are_checked():
    from polykv.errors import InputError

    assert window(8, sinks=2).span == (6, 2)
    assert window(8, sinks=2, width=6).span == (6, 2)
    with pytest.raises(InputError, match="window 5 \\+ sinks 2 is not the budget 8"):
        window(8, sinks=2, width=5)
    with pytest.raises(InputError, match="budget 2 leaves no window beside 2 sinks"):
        window(2, sinks=2)


def test_eval_engine_prefills_window_jobs_itself():
    """Window jobs (several budgets, so per-row windows in one stacked batch) predict what `polykv run` does."""
    from polykv.evaluate.engine import evaluate_instance, reprefill_instance
    from polykv.evaluate.methods import parse_methods
    from polykv.evaluate.tasks import TaskInstance

    loaded = tiny_loaded("eager")
    inst = TaskInstance(
        "i0", "retrieval", "alpha beta gamma " * 20 + "the code is 714.", "Code?", ["714"], "substring", 8
    )
    methods = parse_methods("full,uniform:window,uniform:snapkv", None)
    for mode in ("query-aware", "context-only"):
        fast = evaluate_instance(loaded, inst, methods, [6, 12, 20], mode=mode)
        slow, _ = reprefill_instance(loaded, inst, methods, [6, 12, 20], mode=mode)
        got = {(r["method"], r["budget"]): r["prediction"] for r in fast.rows}
        for r in slow:
            assert got[(r["method"], r["budget"])] == r["prediction"], (mode, r["method"], r["budget"])


def test_calibration_measures_window_options_as_documented():
    """e2e KL of a window option = the answer teacher-forced through the layer's window and sinks after the
    capture's full prefill (the approximation `calibrate.sensitivity` documents), batched with other options."""
    from polykv.calibrate.sample import prepare
    from polykv.calibrate.sensitivity import Option, e2e_losses
    from polykv.prompts import encode

    lm = tiny_loaded("eager")
    context, question, answer = "alpha beta gamma " * 6 + "The key is 417.", "Key?", "417 and 9 more"
    prepared = prepare(lm.model, lm.tokenizer, context, question, answer, None, 16)
    prompt = encode(lm.tokenizer, context, question).ids
    t, m = prompt.shape[1], prepared.answer_in.shape[1]
    settings = [window(3), window(5, sinks=2), LayerSetting(make_policy("snapkv"), 8), window(12, sinks=3)]
    options = [Option(s.policy.name, s.budget, s) for s in settings]
    full_lp = prepared.full_logprobs
    for layer in range(3):
        got = e2e_losses(lm.model, prepared, layer, options, batch=4)
        for setting, (_, kl) in zip(settings, got, strict=True):
            if setting.span is None:
                continue
            with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
                patch_windowed_eager(mp, {layer: setting.span}, full_rows=t)
                logits = lm.model(input_ids=torch.cat([prompt, prepared.answer_in], 1), use_cache=False).logits
            lp = torch.log_softmax(logits[0, t : t + m].float(), -1)
            want = float((full_lp.exp() * (full_lp - lp)).sum(-1).mean())
            assert kl == pytest.approx(want, rel=1e-3, abs=1e-6), (layer, setting.span)
