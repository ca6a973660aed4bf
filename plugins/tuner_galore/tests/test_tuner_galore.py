"""GaLore tuner: options, which weights are projected, and the optimizer it builds."""

from __future__ import annotations

import pytest

import modelloop_tuner_galore as galore
from modelloop.models.loading import load_model


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"proj_type": "diagonal"}, "proj_type must be one of"),
        ({"gap": 5}, "unknown option 'gap'"),
    ],
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


def test_galore_trains_every_weight_so_tensor_parallelism_takes_it_and_matches_one_process(
    tiny_models, subprocess_env, tmp_path
):
    """tp asks the tuner whether it trains every weight; GaLore's projected update on
    the split layers is the one it makes on whole ones."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, REPO / "examples" / "make_demo_data.py", data, "--count", "32"],
        check=True,
        capture_output=True,
    )
    settings = [
        "--model",
        str(tiny_models("qwen2")),
        "--data",
        str(data / "tasks.jsonl"),
        "--tuner",
        "galore",
        "--set",
        "tuner_options.rank=8",
        "--set",
        "tuner_options.update_proj_gap=2",
    ]
    settings += [
        "--lr",
        "1e-2",
        "--max-steps",
        "3",
        "--logging-steps",
        "1",
        "--batch-size",
        "4",
        "--no-packing",
        "--max-length",
        "64",
    ]
    losses = {}
    for name, parallel in (("one", []), ("tp", ["--nproc", "2", "--strategy", "tp"])):
        done = subprocess.run(
            [sys.executable, "-m", "modelloop", "sft", *settings, *parallel, "--output-dir", str(tmp_path / name)],
            env=subprocess_env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        records = map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
        losses[name] = [record["loss"] for record in records if "loss" in record]
    assert len(losses["one"]) == 3 and losses["tp"] == pytest.approx(losses["one"], rel=1e-4)
