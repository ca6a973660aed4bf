"""Tokenisation + packing throughput and peak memory on generated chat records.

Generates N records (default 100,000: arithmetic, string reversal and two-turn
conversations, in the messages format), builds the tiny Qwen2 model locally, then times
each step of modelloop's data pipeline in this one process:

  read + validate   files -> canonical records, every record checked
  tokenise          render with the chat template, mask labels, tokenise (cache off)
  cache load        the same call again, served from the on-disk cache
  pack              best-fit-decreasing into rows of --max-length

and, as a baseline, transformers' own ``apply_chat_template(tokenize=True)`` per record
(which gives no label mask). It also reports how much padding packing saves against
padded batches in random and length_grouped order.

Run: .venv/bin/python bench/data_throughput.py [--records 100000] [--max-length 512]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import string
import tempfile
import time
from pathlib import Path


def generate(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as out:
        for index in range(count):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 30)))
            if index % 3 == 0:
                messages = [
                    {"role": "user", "content": f"What is {a}+{b}?"},
                    {"role": "assistant", "content": str(a + b)},
                ]
            elif index % 3 == 1:
                messages = [
                    {"role": "user", "content": f"Reverse the string: {word}"},
                    {"role": "assistant", "content": word[::-1]},
                ]
            else:
                messages = [
                    {"role": "system", "content": "You answer with numbers only."},
                    {"role": "user", "content": f"What is {a}-{b}?"},
                    {"role": "assistant", "content": str(a - b)},
                    {
                        "role": "user",
                        "content": f"And {a}*{b}? Explain your answer: " + " ".join([word] * rng.randint(1, 40)),
                    },
                    {
                        "role": "assistant",
                        "content": f"{a * b}, because " + " ".join([word[::-1]] * rng.randint(1, 60)),
                    },
                ]
            out.write(json.dumps({"messages": messages}) + "\n")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(label: str, count: int, function):
    start = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - start
    print(f"{label:34} {seconds:8.2f} s {count / seconds:12,.0f} examples/s   peak RSS {peak_rss_mib():7.0f} MiB")
    return result, seconds


def padded_waste(lengths: list[int], batch_size: int) -> float:
    from modelloop.data.packing import padding_waste

    return padding_waste(lengths, batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    arguments = parser.parse_args()

    import os

    work = Path(tempfile.mkdtemp(prefix="modelloop-bench-"))
    os.environ["MODELLOOP_CACHE"] = str(work / "cache")
    from modelloop.chat import resolve_chat_format
    from modelloop.data.packing import pack
    from modelloop.data.records import read_records
    from modelloop.data.tokenize import prepare_data
    from modelloop.models.loading import load_tokenizer, resolve_family
    from modelloop.models.new_model import new_model
    from modelloop.registry import SAMPLERS, get_registry

    data = work / "chat.jsonl"
    generate(data, arguments.records)
    model = new_model("qwen2", "tiny", work / "tiny-qwen2")
    tokenizer = load_tokenizer(model)
    chat = resolve_chat_format(tokenizer, resolve_family("qwen2"))
    count = arguments.records
    print(
        f"{count:,} records, {data.stat().st_size / 2**20:.1f} MiB JSONL, max_length {arguments.max_length}, "
        f"tokenizer {type(tokenizer).__name__} ({len(tokenizer)} tokens)"
    )
    print(f"{'step':34} {'wall':>10} {'throughput':>22}")
    print(f"{'(after imports and model build)':34} {'':>10} {'':>22}   peak RSS {peak_rss_mib():7.0f} MiB")

    timed("read + validate", count, lambda: read_records([data]))
    tokenized, tokenize_seconds = timed(
        "read + validate + tokenise",
        count,
        lambda: prepare_data([data], tokenizer, chat, max_length=arguments.max_length),
    )
    timed(
        "cache load (second run)", count, lambda: prepare_data([data], tokenizer, chat, max_length=arguments.max_length)
    )
    rows, _ = timed("pack", count, lambda: pack(tokenized.input_ids, tokenized.labels, arguments.max_length))

    sample = [json.loads(line)["messages"] for _, line in zip(range(10_000), data.open())]
    _, baseline_seconds = timed(
        "baseline: apply_chat_template (10k)",
        len(sample),
        lambda: [tokenizer.apply_chat_template(messages, tokenize=True) for messages in sample],
    )
    ours = count / tokenize_seconds
    theirs = len(sample) / baseline_seconds
    print(f"modelloop tokenise (with label masks) vs apply_chat_template: {ours / theirs:.2f}x the examples/s")

    lengths = tokenized.lengths
    samplers = get_registry(SAMPLERS)
    random_order = [lengths[i] for i in samplers.get("random").order(lengths, batch_size=arguments.batch_size, seed=0)]
    grouped = [
        lengths[i] for i in samplers.get("length_grouped").order(lengths, batch_size=arguments.batch_size, seed=0)
    ]
    row_lengths = [len(row.input_ids) for row in rows]
    tokens = sum(lengths)
    print(
        f"\n{tokens:,} tokens in {len(lengths):,} examples -> {len(rows):,} packed rows "
        f"({tokens / (len(rows) * arguments.max_length):.1%} full)"
    )
    for label, waste in (
        ("padded batches, random order", padded_waste(random_order, arguments.batch_size)),
        ("padded batches, length_grouped", padded_waste(grouped, arguments.batch_size)),
        ("packed rows (padded to longest row)", padded_waste(row_lengths, arguments.batch_size)),
    ):
        print(f"padding share of computed tokens, {label:38} {waste:6.1%}")


if __name__ == "__main__":
    main()
