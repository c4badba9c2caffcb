"""
Benchmark the emulator: one 100,000-request batch (~50 MB body) in and out.

Runs the emulator as a subprocess (so its peak RSS, VmHWM, is its own), streams
the create body from a spool file, and reads the results back three ways:
the first fetch (which includes writing the results file), the SDK's JSONL
decoder, and raw bytes parsed with orjson. Prints the figures; asserts nothing.

    .venv/bin/python bench/bench_emulator.py [--requests 100000] [--chars 300]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx2
import orjson

ROOT = Path(__file__).resolve().parent.parent


def _vm(pid: int, field: str) -> int:
    """A /proc/<pid>/status memory field in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def _write_body(path: Path, count: int, chars: int) -> int:
    """Write the create body to a spool file, one request at a time; returns its size."""
    filler = ("The printer on floor three prints only smudges since the update. " * 20)[:chars]
    with path.open("wb") as out:
        out.write(b'{"requests":[')
        for index in range(count):
            request = {
                "custom_id": f"ticket-{index:06d}",
                "params": {
                    "model": "claude-haiku-4-5",
                    "max_tokens": 32,
                    "system": "Classify the support ticket: hardware, software, billing, other.",
                    "messages": [{"role": "user", "content": f"#{index}: {filler}"}],
                },
            }
            out.write((b"," if index else b"") + orjson.dumps(request))
        out.write(b"]}")
    return path.stat().st_size


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(1024 * 1024):
            yield chunk


def _mb(size: float) -> str:
    return f"{size / 1e6:.1f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--chars", type=int, default=300, help="user text length per request")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-emulator-") as tmp:
        body_path = Path(tmp) / "body.json"
        body_size = _write_body(body_path, args.requests, args.chars)
        process = subprocess.Popen(
            [sys.executable, "-m", "batchd.daemon.emulator", "--port", "0",
             "--state-dir", tmp + "/state"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert process.stdout is not None
            base_url = process.stdout.readline().split()[-1]
            idle_rss = _vm(process.pid, "VmRSS")
            client = anthropic.Anthropic(base_url=base_url, api_key="bench", max_retries=0)

            started = time.perf_counter()
            created = client.post(
                "/v1/messages/batches",
                cast_to=httpx2.Response,
                content=_chunks(body_path),
                options={"headers": {"Content-Type": "application/json"}, "timeout": 600},
            ).json()
            create_s = time.perf_counter() - started
            batch = client.messages.batches.retrieve(created["id"])
            assert batch.request_counts.succeeded == args.requests, batch.request_counts

            timings: dict[str, tuple[float, int]] = {}
            for label in ("raw, first fetch (writes results file)", "raw + orjson"):
                started = time.perf_counter()
                lines = 0
                with client.messages.batches.with_streaming_response.results(batch.id) as resp:
                    for line in resp.iter_lines():
                        orjson.loads(line)
                        lines += 1
                timings[label] = (time.perf_counter() - started, lines)
            started = time.perf_counter()
            lines = sum(1 for _ in client.messages.batches.results(batch.id))
            timings["SDK JSONLDecoder"] = (time.perf_counter() - started, lines)
            peak = _vm(process.pid, "VmHWM")
        finally:
            process.terminate()
            process.wait(timeout=30)

    print(f"requests            {args.requests}")
    print(f"create body         {_mb(body_size)}")
    print(f"create              {create_s:.2f} s  ({_mb(body_size / create_s)}/s)")
    for label, (seconds, lines) in timings.items():
        rate = lines / seconds if seconds else float("inf")
        print(f"results {label:<38} {seconds:.2f} s  {lines} lines  {rate:,.0f} lines/s")
    print(f"emulator RSS idle   {_mb(idle_rss)}")
    print(f"emulator peak RSS   {_mb(peak)}  ({peak / body_size:.2f}x the body)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
