"""The collector's first pass: lines joined on custom_id, whatever their order or shape."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from batchd.daemon.batches.api import StreamCut
from batchd.daemon.config import PipelineConfig, load_config
from batchd.daemon.results.result_join import ResultJoin
from batchd.daemon.results.routing import Route

PIPELINE = """\
[[pipeline]]
name = "tickets"
custom_id = "t-{ticket_id}"

[pipeline.source]
type = "csv"
path = "tickets.csv"
key = "ticket_id"

[pipeline.request]
model = "claude-haiku-4-5"
max_tokens = 8
user = "{body}"

[pipeline.output]
allowed = ["billing", "bug"]
lowercase = true

[[pipeline.sink]]
type = "jsonl"
path = "out"
"""


@pytest.fixture
def pipeline(tmp_path: Path) -> PipelineConfig:
    (tmp_path / "pipeline.toml").write_text(PIPELINE)
    return load_config(tmp_path / "pipeline.toml").pipelines[0]


def succeeded(custom_id: str, text: str, stop: str = "end_turn") -> bytes:
    message = {
        "model": "claude-haiku-4-5", "content": [{"type": "text", "text": text}],
        "stop_reason": stop, "usage": {"input_tokens": 10, "output_tokens": 2},
    }  # fmt: skip
    return orjson.dumps({"custom_id": custom_id, "result": {"type": "succeeded",
                                                            "message": message}})


def errored(custom_id: str, error_type: str) -> bytes:
    error = {"type": "error", "error": {"type": error_type, "message": "nope"}}
    return orjson.dumps({"custom_id": custom_id, "result": {"type": "errored", "error": error}})


def join_of(pipeline: PipelineConfig) -> ResultJoin:
    index = {f"t-{n}": (str(n), 1) for n in range(1, 7)}
    return ResultJoin(pipeline, index, lambda model, usage: 0.25, chunk="c", batch_id="b")


class TestTake:
    def test_every_outcome_routed_once(self, pipeline: PipelineConfig) -> None:
        """Successes become rows keyed by the join key; failures wait for the second pass."""
        join = join_of(pipeline)
        join.take([succeeded("t-3", " Bug\n"), errored("t-1", "invalid_request_error"), b""])
        join.take([succeeded("t-2", "billing", stop="max_tokens"), succeeded("t-3", "billing"),
                   b"  ", succeeded("t-4", "weather"), errored("t-5", "overloaded_error"),
                   succeeded("t-99", "bug")])
        assert [(r.key, r.status, r.output, r.cost_usd) for r in join.rows] == [
            ("3", "succeeded", "bug", 0.25), ("2", "truncated", "billing", 0.25)]
        assert {k: (f.route, f.error_type) for k, f in join.failures.items()} == {
            "t-1": (Route.DEAD, "invalid_request_error"),
            "t-4": (Route.DEAD, "invalid_output"),
            "t-5": (Route.RETRY, "overloaded_error"),
        }
        assert join.missing() == ["t-6"] and join.done == 5
        assert (join.succeeded, join.truncated, join.unknown) == (1, 1, 1)
        # The answer `allowed` rejected (t-4) was billed: it counts as much as the kept ones.
        assert (join.input_tokens, join.output_tokens, join.cost_usd) == (30, 6, 0.75)

    @pytest.mark.parametrize("line", [b'{"custom_id": "t-1", "res', b"[1, 2]", b"null"])
    def test_garbled_line_is_a_cut_stream(self, pipeline: PipelineConfig, line: bytes) -> None:
        """A line that is not a JSON object resumes the stream; lines before it count."""
        join = join_of(pipeline)
        with pytest.raises(StreamCut, match="results line"):
            join.take([succeeded("t-1", "bug"), line, succeeded("t-2", "bug")])
        assert [r.key for r in join.rows] == ["1"] and join.succeeded == 1
