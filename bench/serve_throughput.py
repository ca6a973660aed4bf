"""Serving throughput and latency: `modelloop serve` against `transformers serve`, same model, same run.

Starts each server as its own process on this machine, waits for it, then for 1, 8 and
32 concurrent clients sends chat completions (max_tokens 32, sampled at temperature 1 so
a random-weight model rarely stops early) and prints generated tokens/s and p50/p95
request latency:

  modelloop serve                  the built-in hf engine, batching requests as they arrive
  modelloop serve, batch 1         the same engine one request at a time (the baseline)
  modelloop serve, llamacpp        the llama.cpp engine (the model converted to an f16 GGUF first)
  llama-server                     llama.cpp's own server on that same GGUF, with the engine's
                                   threads, slots and KV pool (built once from the llama.cpp
                                   source llama-cpp-python vendors: a few minutes, then cached)
  transformers serve               the library's own server (default settings)

Usage: .venv/bin/python bench/serve_throughput.py [--model DIR] [--requests-per-client 4]
       [--servers "modelloop serve;modelloop serve, llamacpp"]
(default model: the tiny Qwen2 built by `modelloop new-model`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from modelloop.parallel.world import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MESSAGES = [{"role": "user", "content": "Tell me about rivers and tigers."}]


def tiny_model(model: Path | None) -> Path:
    """The model folder given, or the tiny Qwen2 built into a temporary folder."""
    if model is None:
        model = Path(tempfile.mkdtemp()) / "tiny-qwen2"
        subprocess.run(
            [BIN / "modelloop", "new-model", "--family", "qwen2", "--out", str(model)], check=True, capture_output=True
        )
    return model.resolve()


def start(command: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"server did not start: {' '.join(command)}")


def llama_server() -> Path:
    """llama.cpp's ``llama-server`` of the version llama-cpp-python vendors, built once into
    modelloop's cache from that package's source distribution (the package index only)."""
    from modelloop.paths import cache_home
    from modelloop_export_gguf import download_source, llama_cpp_version

    release = llama_cpp_version()
    binary = cache_home() / "llama.cpp" / release / "llama-server"
    if binary.is_file():
        return binary
    print(f"building llama-server {release} into {binary.parent} (once; a few minutes)", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        with tarfile.open(download_source(release, Path(scratch))) as archive:
            archive.extractall(scratch, filter="data")
        source = next(Path(scratch).glob("*/vendor/llama.cpp"))
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"]
        subprocess.run(["cmake", "-S", source, "-B", source / "build", *flags], check=True, capture_output=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", source / "build", "--target", "llama-server", "-j", jobs], check=True)
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / "build" / "bin" / "llama-server", binary)
    return binary


def served_gguf(model: Path) -> Path:
    """The f16 GGUF the llamacpp engine serves for ``model`` (converted once, cached)."""
    from modelloop_engine_llamacpp import served

    return served(model).gguf


def load(url: str, model: str, clients: int, per_client: int) -> dict[str, float]:
    client = httpx.Client(timeout=600)

    def one(number: int) -> tuple[float, int]:
        started = time.perf_counter()
        response = client.post(
            f"{url}/v1/chat/completions",
            json={"model": model, "messages": MESSAGES, "max_tokens": 32, "temperature": 1.0},
        )
        response.raise_for_status()
        return time.perf_counter() - started, response.json()["usage"]["completion_tokens"]

    one(-1)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients * per_client)))
    wall = time.perf_counter() - started
    latencies = sorted(latency for latency, _ in results)
    return {
        "tokens_per_s": sum(tokens for _, tokens in results) / wall,
        "p50": statistics.median(latencies),
        "p95": latencies[max(0, round(0.95 * len(latencies)) - 1)],
        "requests": len(results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--servers", help="the labels of the servers to run, separated by ';' (default: all)")
    arguments = parser.parse_args()
    model = tiny_model(arguments.model)

    def modelloop_serve(*flags: str):
        return lambda port: [
            str(BIN / "modelloop"),
            "serve",
            str(model),
            "--port",
            str(port),
            "--served-name",
            "m",
            *flags,
        ]

    servers = {
        "modelloop serve": modelloop_serve(),
        "modelloop serve, batch 1": modelloop_serve("--max-batch-size", "1"),
        "modelloop serve, llamacpp": modelloop_serve("--engine", "llamacpp"),
        # the llamacpp engine's defaults: threads, answers decoded together, one KV pool
        "llama-server": lambda port: [
            str(llama_server()),
            "--model",
            str(served_gguf(model)),
            "--port",
            str(port),
            "--threads",
            str(max(1, (os.cpu_count() or 2) - 1)),
            "--threads-batch",
            str(max(1, (os.cpu_count() or 2) - 1)),
            "--parallel",
            "32",
            "--ctx-size",
            "16384",
            "--kv-unified",
            "--jinja",
            "--top-k",
            "0",
            "--top-p",
            "1",
            "--min-p",
            "0",
        ],
        "transformers serve": lambda port: [
            str(BIN / "transformers"),
            "serve",
            str(model),
            "--port",
            str(port),
            "--device",
            "cpu",
        ],
    }
    if arguments.servers:
        wanted = [label.strip() for label in arguments.servers.split(";")]
        if unknown := set(wanted) - set(servers):
            raise SystemExit(f"unknown server {sorted(unknown)[0]!r}; the servers: {'; '.join(servers)}")
        servers = {label: command for label, command in servers.items() if label in wanted}
    print(f"model {model}, max_tokens 32, {arguments.requests_per_client} requests per client")
    print(f"{'server':28} {'clients':>7} {'tokens/s':>9} {'p50 s':>7} {'p95 s':>7}")
    for label, command in servers.items():
        port = free_port()
        process = start(command(port), port)
        name = "m" if label.startswith("modelloop") else str(model)
        try:
            for clients in (1, 8, 32):
                result = load(f"http://127.0.0.1:{port}", name, clients, arguments.requests_per_client)
                print(
                    f"{label:28} {clients:7d} {result['tokens_per_s']:9.1f} {result['p50']:7.2f} {result['p95']:7.2f}",
                    flush=True,
                )
        finally:
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
