"""``python -m batchd.daemon.emulator`` as a real subprocess, and a 100,000-request batch."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import httpx2
import orjson
import pytest

from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.emulator import message_requests, sdk_client

_ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"^listening on http://127\.0\.0\.1:(\d+)$")


def _start(*flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "batchd.daemon.emulator", "--port", "0", *flags],
        cwd=_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture
def served() -> Iterator[Callable[..., tuple[subprocess.Popen[str], str]]]:
    """Start the emulator CLI with flags; returns (process, base_url); stopped afterwards."""
    processes: list[subprocess.Popen[str]] = []

    def start(*flags: str) -> tuple[subprocess.Popen[str], str]:
        process = _start(*flags)
        processes.append(process)
        assert process.stdout is not None
        first = process.stdout.readline().rstrip("\n")
        match = _LISTENING.match(first)
        assert match, f"first line was {first!r}; stderr: {process.stderr}"
        return process, f"http://127.0.0.1:{match.group(1)}"

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


class TestCli:
    def test_prints_listening_first_and_serves(
        self, served: Callable[..., tuple[subprocess.Popen[str], str]]
    ) -> None:
        """The first stdout line names the real port; the SDK works against it; SIGTERM exits 0."""
        process, base_url = served("--latency", "0", "--seed", "7")
        client = sdk_client(base_url)
        batch = client.messages.batches.create(requests=message_requests(3))
        assert client.messages.batches.retrieve(batch.id).request_counts.succeeded == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0

    def test_flags_set_latency_and_faults(
        self, served: Callable[..., tuple[subprocess.Popen[str], str]], tmp_path: Path
    ) -> None:
        """--latency, --ttl, --faults and --state-dir reach the running emulator."""
        _, base_url = served(
            "--latency", "5m", "--ttl", "1h", "--faults", "http500=0,expired=1,slow=10ms",
            "--state-dir", str(tmp_path),
        )  # fmt: skip
        client = sdk_client(base_url)
        batch = client.messages.batches.create(requests=message_requests(2))
        assert batch.processing_status == "in_progress"
        assert (batch.expires_at - batch.created_at).total_seconds() == 3600
        assert (tmp_path / batch.id / "requests.jsonl").exists()
        faults = client.get("/_emulator/faults", cast_to=httpx2.Response).json()
        assert faults["expired"] == 1.0 and faults["slow"] == 0.01

    def test_tier_and_models_flags(
        self, served: Callable[..., tuple[subprocess.Popen[str], str]], tmp_path: Path
    ) -> None:
        """--tier sets the queue and RPM limits; --models adds a model the rows may name."""
        models = tmp_path / "models.toml"
        models.write_text('[models."claude-haiku-6"]\nlike = "claude-haiku-4-5-20251001"\n')
        _, base_url = served("--tier", "build", "--models", str(models))
        client = sdk_client(base_url)
        faults = client.get("/_emulator/faults", cast_to=httpx2.Response).json()
        assert (faults["queue_limit"], faults["rpm_limit"]) == (300_000, 2_000)
        batch = client.messages.batches.create(
            requests=message_requests(1, model="claude-haiku-6")
        )
        assert client.messages.batches.retrieve(batch.id).request_counts.succeeded == 1

    def test_sigint_stops_cleanly(
        self, served: Callable[..., tuple[subprocess.Popen[str], str]]
    ) -> None:
        """SIGINT stops it with exit code 0 as well."""
        process, _ = served()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0

    @pytest.mark.parametrize(
        ("flags", "needle"),
        [
            (("--latency", "2x"), "--latency"),
            (("--faults", "bogus=1"), "bogus"),
            (("--faults", "api_error=3"), "api_error"),
            (("--rules", "/nonexistent/rules.toml"), "/nonexistent/rules.toml"),
            (("--tier", "gold"), "--tier"),
            (("--models", "/nonexistent/models.toml"), "/nonexistent/models.toml"),
            (("--faults", "http_fault_on=list"), "http_fault_on"),
            (("--faults", "slow=5x"), "slow"),
        ],
    )
    def test_bad_flags_exit_2_naming_the_flag(self, flags: tuple[str, ...], needle: str) -> None:
        """A bad flag value exits 2 with a message naming it, and prints nothing on stdout."""
        result = subprocess.run(
            [sys.executable, "-m", "batchd.daemon.emulator", "--port", "0", *flags],
            cwd=_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2
        assert needle in result.stderr and result.stdout == ""


class TestLargeBatch:
    def test_100000_requests_round_trip(self, emulator: EmulatorThread) -> None:
        """A 100,000-request (~25 MB) streamed create ends with 100,000 distinct result lines."""
        count = 100_000
        template = message_requests(1)[0]["params"]

        def body() -> Iterator[bytes]:
            yield b'{"requests":['
            for start in range(0, count, 5000):
                yield b",".join(
                    orjson.dumps({"custom_id": f"big-{i}", "params": template})
                    for i in range(start, min(start + 5000, count))
                ) + (b"," if start + 5000 < count else b"")
            yield b"]}"

        client = sdk_client(emulator.base_url, timeout=60)
        created = client.post(
            "/v1/messages/batches",
            cast_to=httpx2.Response,
            content=body(),
            options={"headers": {"Content-Type": "application/json"}},
        ).json()
        assert created["request_counts"]["processing"] == count
        batch = client.messages.batches.retrieve(created["id"])
        assert batch.request_counts.succeeded == count
        seen = set()
        with client.messages.batches.with_streaming_response.results(batch.id) as response:
            for line in response.iter_lines():
                seen.add(orjson.loads(line)["custom_id"])
        assert len(seen) == count
        assert emulator.stats()["requests_received"] == count

    def test_results_survive_sdk_decoder(self, emulator: EmulatorThread) -> None:
        """The SDK's own JSONL decoder reads a few thousand lines without error."""
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(3000))
        client.messages.batches.retrieve(batch.id)
        results = client.messages.batches.results(batch.id)
        assert sum(1 for line in results if line.result.type == "succeeded") == 3000
        with pytest.raises(anthropic.NotFoundError):
            client.messages.batches.results("msgbatch_01missing")
