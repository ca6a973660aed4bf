"""`modelloop serve` overloaded: does it shed load (429, 503) and keep admitted requests fast?

Starts a server on the tiny Qwen2, measures the latency of short chat completions from one
client (unloaded), then from 4x as many concurrent clients as the server holds at once
(twice --max-batch-size rows in the engine plus --max-queued waiting), each waiting as long
as a refusal's Retry-After says before it sends again, as the openai client does. Prints the requests, their statuses, p50/p99 latency of the answered
ones, the loaded p99 over the unloaded p99 (target: at most 2), the slowest /health, and the
server's RSS before and after the overload.

Usage: .venv/bin/python bench/serve_overload.py [--model DIR] [--max-batch-size 8] [--max-queued 0] [--seconds 10]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from serve_throughput import BIN, free_port, start, tiny_model

REQUEST = {
    "model": "m",
    "messages": [{"role": "user", "content": "Tell me about rivers."}],
    "max_tokens": 16,
    "temperature": 0,
}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * len(ordered)))] if ordered else float("nan")


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def unloaded(url: str, count: int) -> list[tuple[int, float]]:
    with httpx.Client(timeout=60) as client:
        client.post(f"{url}/v1/chat/completions", json=REQUEST)  # warm-up
        return [timed(client, url)[:2] for _ in range(count)]


def timed(client: httpx.Client, url: str) -> tuple[int, float, float]:
    """One request's status (0: no answer), seconds, and the seconds its Retry-After asks for."""
    started = time.perf_counter()
    try:
        response = client.post(f"{url}/v1/chat/completions", json=REQUEST)
    except httpx.HTTPError:
        return 0, time.perf_counter() - started, 0.0
    return response.status_code, time.perf_counter() - started, float(response.headers.get("Retry-After", 0))


def overload(url: str, clients: int, seconds: float) -> tuple[list[tuple[int, float]], float]:
    """Every request's status and seconds, and the slowest /health, with ``clients`` sending at once."""
    results: list[tuple[int, float]] = []
    health: list[float] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                status, seconds, retry_after = timed(http, url)
                results.append((status, seconds))
                time.sleep(retry_after)

    def watch() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            httpx.get(f"{url}/health", timeout=10)
            health.append(time.perf_counter() - started)
            time.sleep(0.1)

    with ThreadPoolExecutor(clients + 1) as pool:
        running = [pool.submit(client) for _ in range(clients)] + [pool.submit(watch)]
        time.sleep(seconds)
        stop.set()
        for future in running:
            future.result()
    return results, max(health)


def row(label: str, results: list[tuple[int, float]]) -> str:
    statuses = collections.Counter(status for status, _ in results)
    answered = [seconds for status, seconds in results if status == 200]
    other = sum(count for status, count in statuses.items() if status not in (200, 429, 503))
    return (
        f"{label:14} {len(results):8d} {statuses[200]:6d} {statuses[429]:6d} {statuses[503]:6d} {other:6d} "
        f"{statistics.median(answered):8.3f} {percentile(answered, 0.99):8.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queued", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--unloaded-requests", type=int, default=50)
    arguments = parser.parse_args()
    model = tiny_model(arguments.model)
    port = free_port()
    limits = [
        "--max-batch-size",
        str(arguments.max_batch_size),
        "--max-queued",
        str(arguments.max_queued),
        "--request-timeout",
        str(arguments.request_timeout),
    ]
    process = start(
        [str(BIN / "modelloop"), "serve", str(model), "--port", str(port), "--served-name", "m", *limits], port
    )
    url = f"http://127.0.0.1:{port}"
    clients = 4 * (2 * arguments.max_batch_size + arguments.max_queued)
    try:
        alone = unloaded(url, arguments.unloaded_requests)
        before = rss_mib(process.pid)
        loaded, slowest_health = overload(url, clients, arguments.seconds)
        after = rss_mib(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    ratio = percentile([s for c, s in loaded if c == 200], 0.99) / percentile([s for c, s in alone if c == 200], 0.99)
    print(
        f"modelloop serve {' '.join(limits)}; max_tokens {REQUEST['max_tokens']}; overload: {clients} clients for {arguments.seconds:g} s"
    )
    print(f"{'':14} {'requests':>8} {'200':>6} {'429':>6} {'503':>6} {'other':>6} {'p50 s':>8} {'p99 s':>8}")
    print(row("unloaded", alone))
    print(row("4x overload", loaded))
    print(
        f"admitted p99 / unloaded p99: {ratio:.2f} (target <= 2); slowest /health under load: {slowest_health * 1000:.0f} ms"
    )
    print(f"server RSS: {before:.0f} MiB before the overload, {after:.0f} MiB after")


if __name__ == "__main__":
    main()
