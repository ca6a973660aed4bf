"""GaLore tuner: options, which weights are projected, and the optimizer it builds."""

from __future__ import annotations

import pytest

import modelloop_tuner_galore as galore
from modelloop.models.loading import load_model


@pytest.mark.parametrize(
    "options, message",
    [({"rank": 0}, "rank must be a positive integer"), ({"proj_type": "diagonal"}, "proj_type must be one of"), ({"gap": 5}, "unknown option 'gap'")],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        galore.check(options)


def test_the_family_targets_are_projected_and_the_rest_is_plain(tiny_models):
    loaded = load_model(tiny_models("llama"))
    options = galore.check({"rank": 4})
    model = galore.prepare(loaded.model, options, loaded.family)
    plain, projected = galore.parameter_groups(model, options, loaded.family)
    assert len(projected["params"]) == 7 * 4 and projected["rank"] == 4
    assert all(p.dim() == 2 for p in projected["params"])
    assert len(plain["params"]) + len(projected["params"]) == len(list(model.parameters()))
    optimizer = galore.optimizer([plain, projected], lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    assert type(optimizer).__name__ == "AdamW" and type(optimizer).__module__.startswith("galore_torch")
