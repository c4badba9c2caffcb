"""
``make demo``: a real batchd run against the bundled Batches API emulator.

It writes a few thousand realistic tickets (and two malformed rows) to a
CSV, starts the emulator with faults switched on so retries and dead
letters show, runs ``batchd run examples/tickets/pipeline.toml
--until-drained`` as a user would, and ends with the reconciliation:
every row accounted for exactly once, three example answers and one dead letter
with its reason. While it runs, the dashboard is served on a free local port
(the URL is printed); ``--screenshot PATH`` saves a picture of it mid-run with
headless Chromium (that is how docs/dashboard.png is made).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from batchd.daemon.emulator import EmulatorConfig, EmulatorThread
from examples.tickets.generate import write_tickets

ROOT = Path(__file__).resolve().parent
OUT = ROOT.parent / "demo-output"
ROWS = 3000
FAULTS = {
    "api_error": 0.04,
    "overloaded_error": 0.02,
    "expired": 0.02,
    "invalid_request": 0.005,
    "http429": 0.03,
    "http500": 0.01,
    "drop_after_create": 0.25,
    "cut_results_after": 400,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def prepare(port: int) -> Path:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    write_tickets(OUT / "tickets.csv", ROWS, seed=7, bad_rows=True)
    config = (ROOT / "tickets" / "pipeline.toml").read_text()
    config = config.replace('poll_interval = "30s"', 'poll_interval = "0.5s"')
    config = config.replace("\n[api]\n", f"\n[metrics]\nport = {port}\n\n[api]\n", 1)
    (OUT / "pipeline.toml").write_text(config)
    return OUT / "pipeline.toml"


def run_batchd(config: Path, base_url: str, port: int, console: Console,
               screenshot: Path | None) -> int:
    env = {**os.environ, "ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "demo-key"}
    log = (OUT / "batchd.log").open("wb")
    cmd = [sys.executable, "-m", "batchd.daemon.cli", "run", str(config), "--until-drained",
           "--log-format", "json"]
    console.print(f"[dim]$ ANTHROPIC_BASE_URL={base_url} batchd run {config.name} "
                  "--until-drained[/dim]")
    console.print(f"[dim]dashboard while it runs: http://127.0.0.1:{port}/[/dim]")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    with console.status("batchd is running...") as status:
        while proc.poll() is None:
            time.sleep(0.5)
            done = _terminal_rows(config)
            status.update(f"batchd is running... {done:,} rows terminal")
            if screenshot is not None and 0 < done < ROWS:  # mid-run: some done, some not
                _screenshot(f"http://127.0.0.1:{port}/", screenshot)
                console.print(f"[dim]dashboard screenshot: {screenshot}[/dim]")
                screenshot = None
    log.close()
    return proc.returncode


def _screenshot(url: str, path: Path) -> None:
    """A PNG of ``url`` from headless Chromium (Debian's ``chromium`` package)."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
             "--window-size=1100,1250", f"--screenshot={path.resolve()}", url],
            check=True, capture_output=True, text=True, timeout=60,
        )
    if not path.exists():
        raise RuntimeError(f"chromium wrote no screenshot of {url}: {proc.stderr[-500:]}")


def _terminal_rows(config: Path) -> int:
    result = subprocess.run(
        [sys.executable, "-m", "batchd.daemon.cli", "status", str(config), "--json"],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        return 0
    return sum(p["rows_done"] for p in json.loads(result.stdout)["pipelines"])


def examples(labels: dict[str, str], dead: list[dict], console: Console) -> None:
    """Three tickets with their labels, and one dead letter with its reason."""
    with (OUT / "tickets.csv").open(newline="", encoding="utf-8") as f:
        bodies = {row["ticket_id"]: row["body"] for row in csv.DictReader(f)}
    table = Table(title="three answers", show_header=True, header_style="bold")
    table.add_column("ticket")
    table.add_column("body")
    table.add_column("label")
    for key in sorted(labels)[:3]:
        table.add_row(key, bodies.get(key, "")[:48], labels[key])
    console.print(table)
    if dead:
        row = next((d for d in dead if d.get("error_type") not in ("bad_record",)), dead[0])
        console.print(f"a dead letter: [bold]{row['key']}[/bold] → {row['error_type']}: "
                      f"{str(row.get('error_message') or '')[:120]} "
                      f"(after {row.get('attempts')} attempt(s); "
                      f"`batchd show {OUT / 'pipeline.toml'} {row['key']}` tells its story)")


def reconcile(config: Path, stats: dict, console: Console) -> bool:
    status = json.loads(subprocess.run(
        [sys.executable, "-m", "batchd.daemon.cli", "status", str(config), "--json"],
        capture_output=True, text=True, check=True,
    ).stdout)["pipelines"][0]
    with sqlite3.connect(OUT / "out" / "labels.sqlite") as db:
        labels = dict(db.execute("SELECT key, output FROM results").fetchall())
    dead = [json.loads(line) for f in sorted((OUT / "out" / "dead-letters").glob("*.jsonl"))
            for line in f.open()]
    with (OUT / "tickets.csv").open() as f:
        source_rows = sum(1 for _ in f) - 1
    dead_keys = [d["key"] for d in dead]
    overlap = set(labels) & set(dead_keys)
    sent = Counter(stats["received"].values())

    table = Table(title="reconciliation", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("rows", justify="right")
    table.add_row("rows in tickets.csv", f"{source_rows:,}")
    table.add_row("requests submitted (incl. retries)", f"{status['requests_submitted']:,}")
    table.add_row("batches created", f"{stats['batches_created']:,}")
    table.add_row("succeeded → SQLite + JSONL", f"{status['succeeded']:,}")
    table.add_row("truncated (max_tokens, kept)", f"{status['truncated']:,}")
    table.add_row("retried (transient errors, expiry)", f"{status['retried']:,}")
    for kind, count in Counter(d["error_type"] for d in dead).most_common():
        table.add_row(f"dead-lettered: {kind}", f"{count:,}")
    table.add_row("accounted for", f"{len(labels) + len(dead):,}")
    table.add_row("cost (batch prices)", f"${status['cost_usd']:.4f}")
    console.print(table)

    by_label = Table(title="labels", show_header=True, header_style="bold")
    by_label.add_column("label")
    by_label.add_column("tickets", justify="right")
    for label, count in Counter(labels.values()).most_common():
        by_label.add_row(label, f"{count:,}")
    console.print(by_label)

    examples(labels, dead, console)
    console.print(f"times a custom_id reached the API: "
                  f"{dict(sorted(sent.items()))} (max_attempts = 3)")
    ok = len(labels) + len(dead) == source_rows and not overlap and max(sent) <= 3
    verdict = "[green]every row has exactly one outcome[/green]" if ok else "[red]MISMATCH[/red]"
    console.print(verdict)
    console.print(f"[dim]outputs: {OUT / 'out'}  ·  log: {OUT / 'batchd.log'}  ·  "
                  f"batchd status {OUT / 'pipeline.toml'}[/dim]")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--screenshot", type=Path, help="save the dashboard mid-run as a PNG")
    args = parser.parse_args(argv)
    console = Console()
    port = _free_port()
    config = prepare(port)
    console.print(f"[bold]batchd demo[/bold]: {ROWS:,} support tickets → claude-haiku-5-5 "
                  "labels, through a local Message Batches API with faults switched on")
    emulator_config = EmulatorConfig(
        # A picture mid-run needs batches that take a little longer to end.
        latency=6.0 if args.screenshot else 1.0,
        rules=ROOT / "tickets" / "rules.toml", faults=FAULTS, seed=42,
        state_dir=OUT / "emulator",
    )
    with EmulatorThread(emulator_config) as emulator:
        console.print(f"[dim]emulator at {emulator.base_url}, faults: "
                      f"{', '.join(f'{k}={v}' for k, v in FAULTS.items())}[/dim]")
        code = run_batchd(config, emulator.base_url, port, console, args.screenshot)
        if code != 0:
            console.print(f"[red]batchd exited {code}; see {OUT / 'batchd.log'}[/red]")
            return code
        ok = reconcile(config, emulator.stats(), console)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
