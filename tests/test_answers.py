"""
Answers read as today's API returns them: each stop_reason's route with its exact
dead-letter reason, thinking never output, structured output validated and written as
JSON, and every billed answer costed — status matches the cost recomputed from the
emulator's own usage lines and the catalog, to the cent.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchd.daemon.config import PipelineConfig, load_config
from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.models.catalog import default_catalog
from batchd.daemon.results.answers import Answer, AnswerReader, Rejected
from tests.fixtures.emulator import sdk_client
from tests.fixtures.engine import Workspace, describe, dump_toml

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["billing", "bug", "other"]},
                   "urgent": {"type": "boolean"}},
    "required": ["label", "urgent"],
    "additionalProperties": False,
}


def pipeline_of(tmp_path: Path, **request: Any) -> PipelineConfig:
    data = {"pipeline": [{
        "name": "p", "source": {"type": "csv", "path": "x.csv", "key": "id"},
        "request": {"model": "claude-haiku-5-5", "max_tokens": 8, "user": "{body}", **request},
        "sink": [{"type": "jsonl", "path": "out"}]}]}
    path = tmp_path / "p.toml"
    path.write_text(dump_toml(data))
    return load_config(path).pipelines[0]


def message(content: list[dict[str, Any]], stop: str, **extra: Any) -> dict[str, Any]:
    return {"model": "claude-haiku-5-5", "content": content, "stop_reason": stop,
            "usage": {"input_tokens": 10, "output_tokens": 8,
                      "output_tokens_details": {"thinking_tokens": 8}}, **extra}


THINKING = {"type": "thinking", "thinking": "hmm", "signature": "sig"}


class TestRead:
    def test_text_after_thinking_is_the_output(self, tmp_path: Path) -> None:
        reader = AnswerReader(pipeline_of(tmp_path))
        answer = reader.read(message([THINKING, {"type": "redacted_thinking", "data": "x"},
                                      {"type": "text", "text": "bug"}], "end_turn"))
        assert answer == Answer("bug")

    def test_max_tokens_with_text_is_truncated(self, tmp_path: Path) -> None:
        answer = AnswerReader(pipeline_of(tmp_path)).read(
            message([THINKING, {"type": "text", "text": "bi"}], "max_tokens"))
        assert answer == Answer("bi", None, True)

    def test_max_tokens_without_text_is_no_answer_with_advice(self, tmp_path: Path) -> None:
        answer = AnswerReader(pipeline_of(tmp_path)).read(message([THINKING], "max_tokens"))
        assert isinstance(answer, Rejected) and answer.error_type == "no_answer"
        assert answer.message == (
            "no answer: the model spent all 8 max_tokens on thinking (8 thinking tokens) and "
            'wrote no text; set thinking = "disabled" (claude-haiku-5-5 takes it at effort '
            "high or lower), or a lower effort (now medium), or a larger max_tokens (now 8)")

    def test_an_always_thinking_model_is_not_told_to_turn_it_off(self, tmp_path: Path) -> None:
        reader = AnswerReader(pipeline_of(tmp_path, model="claude-opus-5-5"))
        answer = reader.read({**message([THINKING], "max_tokens"), "model": "claude-opus-5-5"})
        assert isinstance(answer, Rejected)
        assert "always thinks" in answer.message and 'thinking = "disabled"' not in answer.message

    def test_refusal_keeps_stop_details(self, tmp_path: Path) -> None:
        details = {"type": "refusal", "category": "cyber", "explanation": "Not this one."}
        answer = AnswerReader(pipeline_of(tmp_path)).read(
            message([], "refusal", stop_details=details))
        assert answer == Rejected("refusal", "the model refused (cyber): Not this one.; not "
                                  "retried, as the same request is refused again (stop_details "
                                  "kept in the message)")

    @pytest.mark.parametrize(("stop", "words"), [
        ("model_context_window_exceeded", "1,000,000 tokens"),
        ("pause_turn", "stop_reason pause_turn")])
    def test_other_stops_are_dead_letters(self, tmp_path: Path, stop: str, words: str) -> None:
        answer = AnswerReader(pipeline_of(tmp_path)).read(
            message([{"type": "text", "text": "x"}], stop))
        assert isinstance(answer, Rejected) and answer.error_type == stop
        assert words in answer.message

    def test_tool_use_input_is_the_output(self, tmp_path: Path) -> None:
        block = {"type": "tool_use", "id": "t", "name": "label", "input": {"label": "bug"}}
        answer = AnswerReader(pipeline_of(tmp_path)).read(
            message([THINKING, {"type": "text", "text": "Let me label it."}, block], "tool_use"))
        assert answer == Answer('{"label":"bug"}', {"label": "bug"})

    def test_structured_output_is_parsed_and_validated(self, tmp_path: Path) -> None:
        reader = AnswerReader(pipeline_of(tmp_path, output_schema=SCHEMA))
        good = reader.read(message([{"type": "text", "text": '{"label":"bug","urgent":true}'}],
                                   "end_turn"))
        assert good == Answer('{"label":"bug","urgent":true}', {"label": "bug", "urgent": True})
        wrong = reader.read(message([{"type": "text", "text": '{"label":"spam","urgent":1}'}],
                                    "end_turn"))
        assert isinstance(wrong, Rejected) and wrong.error_type == "invalid_output"
        assert "does not match output_schema at label" in wrong.message
        cut = reader.read(message([{"type": "text", "text": '{"label":"b'}], "max_tokens"))
        assert isinstance(cut, Rejected) and "cut off" in cut.message


# -- end to end ------------------------------------------------------------------------

RULES = {
    "default": "other",
    "rules": [
        {"pattern": "REFUSE", "stop_reason": "refusal", "category": "cyber",
         "explanation": "Declined."},
        {"pattern": "OVERFLOW", "stop_reason": "model_context_window_exceeded", "reply": "bu"},
        {"pattern": "PAUSE", "stop_reason": "pause_turn", "reply": "bug"},
        {"pattern": "URGENT", "reply": "bug", "json": {"label": "bug", "urgent": True}},
        {"pattern": "invoice", "reply": "billing", "json": {"label": "billing", "urgent": False}},
        {"pattern": "WRONG", "reply": "bug", "json": {"label": "spam", "urgent": False}},
        {"pattern": "crash", "reply": "bug"},
    ],
}
BODIES = {
    "1": "my invoice is wrong", "2": "app crash on start", "3": "REFUSE this please",
    "4": "OVERFLOW the window", "5": "PAUSE the tools", "6": "URGENT crash now",
    "7": "WRONG label please", "8": "nothing to say",
}


def _csv(ws: Workspace) -> None:
    lines = ["ticket_id,body"] + [f"{k},{v}" for k, v in BODIES.items()]
    (ws.root / "tickets.csv").write_text("\n".join(lines) + "\n")


def _config(ws: Workspace, request: dict[str, Any], *, allowed: bool = True,
            sinks: list[dict[str, Any]] | None = None) -> None:
    table = ws.pipeline(allowed=("billing", "bug", "other") if allowed else None)
    table["request"] = {"model": "claude-haiku-5-5", "user": "{body}", **request}
    if sinks is not None:
        table["sink"] = sinks
    ws.write_raw(dump_toml({"state_dir": "state", "api": {"poll_interval": "0.1s"},
                            "pipeline": [table]}))


def recomputed_cost(base_url: str) -> float:
    """Every succeeded line of every batch, priced by the catalog's numbers (not batchd's)."""
    client = sdk_client(base_url)
    total = 0.0
    for batch in client.messages.batches.list(limit=100):
        for line in client.messages.batches.results(batch.id):
            if line.result.type != "succeeded":
                continue
            msg = line.result.message
            info = default_catalog().get(msg.model)
            assert info is not None and info.price is not None
            u = msg.usage
            prompt = u.input_tokens + (u.cache_creation_input_tokens or 0) + (
                u.cache_read_input_tokens or 0)
            p = info.prices_for(prompt)
            assert p is not None
            w1h = u.cache_creation.ephemeral_1h_input_tokens if u.cache_creation else 0
            w5m = (u.cache_creation_input_tokens or 0) - w1h
            usd = (u.input_tokens * p.input + u.output_tokens * p.output
                   + w5m * p.cache_write_5m + w1h * p.cache_write_1h
                   + (u.cache_read_input_tokens or 0) * p.cache_read) / 1e6
            geo = 1.1 if getattr(u, "inference_geo", None) == "us" else 1.0
            total += usd * geo * 0.5
    return total


@pytest.fixture
def answers_emulator(emulator_factory: Callable[..., EmulatorThread],
                     tmp_path: Path) -> EmulatorThread:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(RULES))
    return emulator_factory(rules=rules)


class TestEndToEnd:
    def test_each_stop_reason_routed_and_every_dollar_counted(
        self, answers_emulator: EmulatorThread, workspace: Callable[..., Workspace]
    ) -> None:
        ws = workspace(answers_emulator.base_url)
        _csv(ws)
        _config(ws, {"max_tokens": 16, "thinking": "disabled", "system": "Label it.",
                     "inference_geo": "us"})
        proc = ws.run()
        assert proc.returncode == 0, describe(proc)
        out = ws.outputs()
        assert out.results == {"1": "billing", "2": "bug", "6": "bug", "7": "bug", "8": "other"}
        dead = {k: (v["error_type"], v["error_message"]) for k, v in out.dead.items()}
        assert dead["3"] == ("refusal", "the model refused (cyber): Declined.; not retried, as "
                             "the same request is refused again (stop_details kept in the "
                             "message)")
        assert dead["4"][0] == "model_context_window_exceeded"
        assert "context window (1,000,000 tokens)" in dead["4"][1]
        assert dead["5"][0] == "pause_turn"
        assert set(dead) == {"3", "4", "5"}
        status = ws.status()["pipelines"][0]
        assert status["dead_lettered"] == 3 and status["succeeded"] == 5
        # Refused, overflowing and paused answers were billed too: status counts all eight.
        assert status["cost_usd"] == pytest.approx(recomputed_cost(answers_emulator.base_url),
                                                   abs=0.005)
        assert status["cost_usd"] > 0 and status["unpriced"] == 0
        assert answers_emulator.stats()["received"] == {f"t-{k}": 1 for k in BODIES}

    def test_thinking_left_on_with_a_tight_max_tokens_is_no_answer(
        self, answers_emulator: EmulatorThread, workspace: Callable[..., Workspace]
    ) -> None:
        """Haiku 5.5 thinks by default: max_tokens = 8 leaves no text, every row is a
        no_answer dead letter with the advice, and their cost is counted; with
        thinking = "disabled" the same rows get labels."""
        ws = workspace(answers_emulator.base_url, "on")
        _csv(ws)
        _config(ws, {"max_tokens": 8})
        proc = ws.run()
        assert proc.returncode == 0, describe(proc)
        assert "thinks unless told otherwise" in proc.stdout + proc.stderr
        out = ws.outputs()
        assert not out.results
        assert {v["error_type"] for v in out.dead.values()} == {"no_answer"}
        assert len(out.dead) == len(BODIES)
        assert all('set thinking = "disabled"' in v["error_message"] for v in out.dead.values())
        assert ws.status()["pipelines"][0]["cost_usd"] > 0

        # The same custom_ids again: the first run's batch is still on the API, and a
        # daemon whose state does not know it adopts it instead of paying again (its
        # answers, none). A fresh API workspace for the second run.
        answers_emulator.reset()
        off = workspace(answers_emulator.base_url, "off")
        _csv(off)
        _config(off, {"max_tokens": 8, "thinking": "disabled"})
        proc = off.run()
        assert proc.returncode == 0, describe(proc)
        assert set(off.outputs().results.values()) <= {"billing", "bug", "other"}
        assert len(off.outputs().results) == 5

    def test_output_schema_into_sqlite_and_jsonl_as_json(
        self, answers_emulator: EmulatorThread, workspace: Callable[..., Workspace]
    ) -> None:
        ws = workspace(answers_emulator.base_url)
        _csv(ws)
        (ws.root / "label.schema.json").write_text(json.dumps(SCHEMA))
        # An existing results table from before output_json: it keeps working.
        ws.out_dir.mkdir()
        db = sqlite3.connect(ws.sqlite_path)
        db.execute("CREATE TABLE results (key TEXT PRIMARY KEY, custom_id TEXT, status TEXT, "
                   "output TEXT, model TEXT, input_tokens INTEGER, output_tokens INTEGER, "
                   "cost_usd REAL, batch_id TEXT, attempt INTEGER, updated_at TEXT)")
        db.execute("INSERT INTO results (key, output) VALUES ('old', 'kept')")
        db.commit()
        db.close()
        _config(ws, {"max_tokens": 64, "thinking": "disabled",
                     "output_schema": "label.schema.json"}, allowed=False)
        proc = ws.run()
        assert proc.returncode == 0, describe(proc)
        out = ws.outputs()
        db = sqlite3.connect(ws.sqlite_path)
        rows = dict(db.execute("SELECT key, output_json ->> '$.label' FROM results"))
        db.close()
        assert rows == {"old": None, "1": "billing", "6": "bug", "2": "bug", "8": "other"}
        lines = {}
        for part in ws.jsonl_dir.glob("*.jsonl"):
            for line in part.read_text().splitlines():
                row = json.loads(line)
                lines[row["key"]] = row["output"]
        assert lines["6"] == {"label": "bug", "urgent": True}  # an object, not a string
        assert out.dead["7"]["error_type"] == "invalid_output"
        assert "does not match output_schema at label" in out.dead["7"]["error_message"]
        assert out.results["old"] == "kept"

    def test_output_schema_into_postgresql_jsonb(
        self, answers_emulator: EmulatorThread, workspace: Callable[..., Workspace],
        pg_dsn: str, pg_schema: str,
    ) -> None:
        """Into a PostgreSQL results table made before output_json existed: the sink adds
        the JSONB column, old rows are kept, and the answers are queryable as JSON."""
        import asyncio

        import asyncpg

        table = f"{pg_schema}.results"

        async def sql(query: str) -> list[asyncpg.Record]:
            conn = await asyncpg.connect(pg_dsn)
            try:
                if ";" in query:
                    await conn.execute(query)
                    return []
                return await conn.fetch(query)
            finally:
                await conn.close()

        asyncio.run(sql(
            f"CREATE TABLE {table} (key TEXT PRIMARY KEY, custom_id TEXT, status TEXT, "
            "output TEXT, model TEXT, input_tokens INTEGER, output_tokens INTEGER, "
            "cost_usd DOUBLE PRECISION, batch_id TEXT, attempt INTEGER, "
            "updated_at TIMESTAMPTZ NOT NULL DEFAULT now());"
            f"INSERT INTO {table} (key, output) VALUES ('old', 'kept')"))
        ws = workspace(answers_emulator.base_url)
        _csv(ws)
        _config(ws, {"max_tokens": 64, "thinking": "disabled", "output_schema": SCHEMA},
                allowed=False,
                sinks=[{"type": "postgres", "dsn": pg_dsn, "table": table}])
        proc = ws.run()
        assert proc.returncode == 0, describe(proc)
        rows = asyncio.run(sql(
            f"SELECT key, output_json->>'label' AS label, jsonb_typeof(output_json) AS kind, "
            f"output FROM {table}"))
        found = {r["key"]: (r["label"], r["kind"]) for r in rows}
        assert found == {"old": (None, None), "1": ("billing", "object"),
                         "2": ("bug", "object"), "6": ("bug", "object"),
                         "8": ("other", "object")}
        assert {r["key"]: r["output"] for r in rows}["old"] == "kept"
