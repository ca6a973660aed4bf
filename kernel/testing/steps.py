"""One LoRA step and one full step on a family's tiny model, and the data preview of what
it trains: what every family plugin's tests show before asserting what its own adapter and
template hold."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Steps:
    """The data trained on, each run's model folder, and ``data preview`` of the first record."""

    data: Path
    lora: Path
    full: Path
    preview: str


def lora_and_full_steps(model: str, folder: Path, *, max_length: int = 64) -> Steps:
    """Train ``model`` one step with LoRA and one with every weight, on eight sums chats."""
    from click.testing import CliRunner

    from modelloop.cli import build_cli
    from modelloop.stages.train import train

    data = folder / "data.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
        for i in range(8)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = {"model": model, "data": [str(data)], "max_steps": 1, "batch_size": 4, "max_length": max_length}
    base["gradient_checkpointing"] = False  # one step: no memory to save, and no forward to repeat
    lora = train(
        "sft", {**base, "tuner": "lora", "tuner_options": {"dropout": 0.0}, "output_dir": str(folder / "lora")}
    )
    full = train("sft", {**base, "tuner": "full", "output_dir": str(folder / "full")})
    lora_model, full_model = Path(lora["run_dir"]) / "model", Path(full["run_dir"]) / "model"
    assert (lora_model / "adapter_model.safetensors").is_file() and (full_model / "config.json").is_file()
    shown = CliRunner().invoke(build_cli(), ["data", "preview", str(data), "--model", model, "-n", "1"])
    assert shown.exit_code == 0, shown.output
    return Steps(data=data, lora=lora_model, full=full_model, preview=shown.stdout)
