"""Proxy vs e2e on the bundled SmolLM2: do they rank the layers' sensitivity the same way? (runs in CI)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy.stats import spearmanr

from polykv.calibrate.sample import prepare
from polykv.calibrate.sensitivity import Option, e2e_losses, proxy_losses
from polykv.policies import make_policy
from polykv.settings import LayerSetting

pytestmark = pytest.mark.bundled


def test_proxy_and_e2e_rank_layers_consistently(smollm2):
    line = (Path(__file__).parents[1] / "calibration_data" / "default.jsonl").read_text().splitlines()[8]
    sample = json.loads(line)
    prepared = prepare(
        smollm2.model, smollm2.tokenizer, sample["context"], sample["question"], sample["answers"][0], 1024, 64
    )
    options = [Option(p, b, LayerSetting(make_policy(p), b)) for p in ("snapkv", "streaming") for b in (32, 128)]
    proxy, e2e = [], []
    for layer in range(prepared.capture.num_layers):
        proxy.append(sum(err for err, _ in proxy_losses(prepared, layer, options)))
        e2e.append(sum(kl for _, kl in e2e_losses(smollm2.model, prepared, layer, options, batch=4)))
    rho = spearmanr(proxy, e2e).statistic
    print(f"\nSpearman rank correlation of per-layer sensitivity, proxy_err vs e2e_kl: {rho:.3f}")
    assert rho > 0.3, rho
