"""Logging set-up: JSON for journald, console for terminals, and secrets that never get out."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog
from structlog.testing import capture_logs

from batchd.daemon.ops._logging import MASK, configure_logging, redact_secrets, register_secret

API_KEY = "sk-ant-api03-Zx9testKEYnotREAL_0123456789abcdef-AAAA"
DB_PASSWORD = "s3cr3t-Pa55/word@x"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put structlog and the root logger back the way the other tests expect them."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def _redact(**event: Any) -> dict[str, Any]:
    return dict(redact_secrets(None, "info", dict(event)))


class TestRedactionProcessor:
    """The processor on its own, as a plain callable."""

    def test_sensitive_keys_are_masked_whole(self) -> None:
        """api_key, authorization, password and *_token values become ***."""
        out = _redact(
            event="x",
            api_key="abc",
            Authorization="Bearer abc",
            password="pw",
            kafka_sasl_password="pw",
            refresh_token="t",
        )
        assert {k: v for k, v in out.items() if k != "event"} == {
            "api_key": MASK,
            "Authorization": MASK,
            "password": MASK,
            "kafka_sasl_password": MASK,
            "refresh_token": MASK,
        }

    def test_token_counts_are_not_secrets(self) -> None:
        """input_tokens and max_tokens are numbers to keep, not tokens to hide."""
        out = _redact(event="x", input_tokens=12, max_tokens=1024, output_tokens=3)
        assert out == {"event": "x", "input_tokens": 12, "max_tokens": 1024, "output_tokens": 3}

    def test_nested_headers(self) -> None:
        """A headers dict inside the event has its x-api-key masked and the rest kept."""
        out = _redact(event="req", headers={"x-api-key": "k", "anthropic-version": "2023-06-01"})
        assert out["headers"] == {"x-api-key": MASK, "anthropic-version": "2023-06-01"}

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("postgresql://user:secret@host/db", f"postgresql://user:{MASK}@host/db"),
            ("kafka+sasl://app:p%40ss@broker:9092", f"kafka+sasl://app:{MASK}@broker:9092"),
            ("host=db user=u password=secret dbname=x", f"host=db user=u password={MASK} dbname=x"),
            ("host=db password='a b c' port=5", f"host=db password={MASK} port=5"),
            ("https://h/?user=u&password=pw&x=1", f"https://h/?user=u&password={MASK}&x=1"),
            (f"bad key {API_KEY} given", f"bad key sk-ant-{MASK} given"),
            ("Authorization: Bearer abcdefgh12345", f"Authorization: Bearer {MASK}"),
            ("https://example.com/path", "https://example.com/path"),
        ],
    )
    def test_patterns_inside_any_string(self, text: str, expected: str) -> None:
        """URL passwords, password= pairs, Anthropic keys and bearer tokens are masked."""
        assert _redact(event=text)["event"] == expected

    def test_registered_secret_inside_message_and_list(self) -> None:
        """A registered literal is masked in the message and in nested containers."""
        register_secret("plainliteral-9321")
        out = _redact(event="got plainliteral-9321", items=["a", ("plainliteral-9321",)])
        assert out == {"event": f"got {MASK}", "items": ["a", [MASK]]}

    def test_registered_secret_url_encoded(self) -> None:
        """A password with @ and / is also masked in its percent-encoded DSN spelling."""
        register_secret(DB_PASSWORD)
        out = _redact(event="dsn postgres://u:s3cr3t-Pa55%2Fword%40x@h/db and s3cr3t-Pa55/word@x")
        assert "s3cr3t" not in out["event"]

    def test_short_secret_is_not_masked_literally(self) -> None:
        """A 3-character secret would blank out ordinary words, so it is not masked."""
        register_secret("abc")
        assert _redact(event="abcdef")["event"] == "abcdef"

    def test_objects_are_stringified_then_redacted(self) -> None:
        """An exception passed as a value is rendered to text and then masked."""
        out = _redact(event="x", error=ConnectionError("postgresql://u:pw@h refused"))
        assert out["error"] == f"postgresql://u:{MASK}@h refused"


class TestCapturedEvents:
    """The processor in a real structlog chain, checked on the event dicts."""

    def test_exception_text_is_redacted(self) -> None:
        """A traceback mentioning the API key is masked after format_exc_info renders it."""
        register_secret(API_KEY)
        log = structlog.get_logger()
        with capture_logs(
            processors=[structlog.processors.format_exc_info, redact_secrets]
        ) as logs:
            try:
                raise PermissionError(f"key {API_KEY} rejected")
            except PermissionError:
                log.exception("submit_failed", pipeline="p")
        (entry,) = logs
        assert "PermissionError: key *** rejected" in entry["exception"]
        assert API_KEY not in repr(entry)


class TestRenderedOutput:
    """What reaches the stream, rendered."""

    def test_json_lines_with_level_and_timestamp(self) -> None:
        """Each event is one orjson line with timestamp, level and event first."""
        stream = io.StringIO()
        configure_logging("info", json=True, stream=stream)
        structlog.get_logger().info("batch_submitted", pipeline="p", batch_id="msgbatch_1")
        line = stream.getvalue().splitlines()[-1]
        record = orjson.loads(line)
        assert list(record)[:3] == ["timestamp", "level", "event"]
        assert record["level"] == "info" and record["batch_id"] == "msgbatch_1"
        assert record["timestamp"].endswith("Z")

    def test_level_filters_own_events(self) -> None:
        """At level warning an info event is dropped."""
        stream = io.StringIO()
        configure_logging("warning", json=True, stream=stream)
        structlog.get_logger().info("quiet")
        structlog.get_logger().warning("loud")
        assert [orjson.loads(x)["event"] for x in stream.getvalue().splitlines()] == ["loud"]

    def test_stdlib_loggers_routed_at_warning(self) -> None:
        """aiokafka's warnings come out as redacted JSON; its info lines do not."""
        stream = io.StringIO()
        configure_logging("debug", json=True, stream=stream)
        logging.getLogger("aiokafka.conn").info("chatter")
        logging.getLogger("aiokafka.conn").warning("lost %s", "postgresql://a:pw1234@h")
        lines = [orjson.loads(x) for x in stream.getvalue().splitlines()]
        assert lines == [
            {
                "timestamp": lines[0]["timestamp"],
                "level": "warning",
                "event": f"lost postgresql://a:{MASK}@h",
                "logger": "aiokafka.conn",
            }
        ]

    def test_reconfigure_does_not_duplicate_library_lines(self) -> None:
        """Calling configure_logging twice (SIGHUP) still gives one line per record."""
        stream = io.StringIO()
        configure_logging(json=True, stream=stream)
        configure_logging(json=True, stream=stream)
        logging.getLogger("httpx").error("once")
        assert stream.getvalue().count('"once"') == 1

    def test_console_when_stream_is_a_terminal(self) -> None:
        """json=None renders for people when the stream is a TTY."""
        leader, follower = os.openpty()
        try:
            with open(follower, "w", closefd=True) as tty:
                configure_logging(stream=tty)
                structlog.get_logger().info("hello_console", pipeline="p")
                tty.flush()
                text = os.read(leader, 4096).decode()
        finally:
            os.close(leader)
        assert "hello_console" in text and "pipeline" in text
        assert not text.lstrip().startswith("{")

    def test_unknown_level_names_the_value(self) -> None:
        """A typo in the level is a clear error naming what was given."""
        with pytest.raises(ValueError, match="'verbose'"):
            configure_logging("verbose", stream=io.StringIO())


_CHILD = textwrap.dedent(
    f"""
    import logging, structlog
    from batchd.daemon.ops._logging import configure_logging, register_secret
    configure_logging()  # stdout is a pipe here, as under journald
    register_secret({API_KEY!r})
    register_secret({DB_PASSWORD!r})
    log = structlog.get_logger()
    log.info("loaded", api_key={API_KEY!r}, dsn="postgresql://app:{DB_PASSWORD}@db/x")
    log.info("message mentions {API_KEY} inline")
    log.warning("env", environ={{"ANTHROPIC_API_KEY": {API_KEY!r}}})
    try:
        raise RuntimeError("connect failed: password={DB_PASSWORD}")
    except RuntimeError:
        log.exception("source_lost", source="postgres")
    logging.getLogger("asyncpg").warning("retrying with %s", {DB_PASSWORD!r})
    """
)


class TestSubprocessJournalOutput:
    """A real process writing to a pipe, the way systemd runs it."""

    def test_secrets_never_reach_stdout(self) -> None:
        """Neither the registered key nor the DSN password appears in any JSON line."""
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        lines = proc.stdout.splitlines()
        events = [orjson.loads(line) for line in lines]
        assert [e["event"] for e in events][:3] == [
            "loaded",
            f"message mentions {MASK} inline",
            "env",
        ]
        assert len(events) == 5
        assert "RuntimeError" in events[3]["exception"]
        assert events[4]["logger"] == "asyncpg"
        for secret in (API_KEY, DB_PASSWORD, "s3cr3t", "Zx9testKEY"):
            assert secret not in proc.stdout
            assert secret not in proc.stderr
