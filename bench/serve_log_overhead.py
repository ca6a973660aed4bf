"""What `serve --log` costs: generated tokens/s at 32 clients with and without the request log.

Starts two `modelloop serve` processes on the same model (one with `--log DIR`), both
idle but for the one under load, then alternates rounds of the load of
bench/serve_throughput.py (chat completions, max_tokens 32, temperature 1) between them,
``--rounds`` times each, and compares the medians. Target (issue 21): the log costs at
most 3 % of the throughput at 32 clients.

Usage: .venv/bin/python bench/serve_log_overhead.py [--model DIR] [--clients 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from serve_throughput import BIN, load, start, tiny_model

from modelloop.inference.request_log import read_log
from modelloop.parallel.world import free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    model = tiny_model(arguments.model)
    log = Path(tempfile.mkdtemp()) / "log"
    servers = {}
    for label, extra in (("without log", []), ("with --log", ["--log", str(log)])):
        port = free_port()
        command = [str(BIN / "modelloop"), "serve", str(model), "--port", str(port), "--served-name", "m", *extra]
        servers[label] = (start(command, port), f"http://127.0.0.1:{port}")
    print(f"model {model}, {arguments.clients} clients x {arguments.requests_per_client} requests, max_tokens 32")
    rates: dict[str, list[float]] = {label: [] for label in servers}
    try:
        for round_number in range(arguments.rounds):
            for label, (_, url) in servers.items():
                result = load(url, "m", arguments.clients, arguments.requests_per_client)
                rates[label].append(result["tokens_per_s"])
                print(
                    f"round {round_number + 1}  {label:12} {result['tokens_per_s']:9.1f} tokens/s  "
                    f"p50 {result['p50']:.2f} s  p95 {result['p95']:.2f} s",
                    flush=True,
                )
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=60)
    logged = sum(1 for entry in read_log(log) if entry["type"] == "request")
    without, with_log = (statistics.median(rates[label]) for label in servers)
    print(f"\nmedian tokens/s: without log {without:.1f}, with --log {with_log:.1f}: ratio {with_log / without:.3f}")
    print(f"target: >= 0.97 (the log costs at most 3 %); {logged} requests logged under {log}")
    if logged != arguments.rounds * (arguments.clients * arguments.requests_per_client + 1):
        sys.exit("the log is missing requests")


if __name__ == "__main__":
    main()
