"""The `orch-worker` command line: the processes of the system and the operator's tools."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orch_worker.domain.config import OrchConfig
from orch_worker.settings import ConfigError, load_config

log = logging.getLogger("orch_worker")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config(args: argparse.Namespace, http_port_field: str | None = None) -> OrchConfig:
    cfg = load_config(args.config, bootstrap=getattr(args, "bootstrap", None))
    port = getattr(args, "http_port", None)
    if port is None and os.environ.get("ORCH_HTTP_PORT"):
        port = int(os.environ["ORCH_HTTP_PORT"])
    if port is not None and http_port_field:
        section = getattr(cfg, http_port_field)
        cfg = cfg.model_copy(
            update={http_port_field: section.model_copy(update={"http_port": port})}
        )
    return cfg


async def _until_signalled(body: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await body(stop)


# -- process commands ----------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from orch_worker.adapters.kafka.worker_app import Worker

    cfg = _config(args, "worker")

    failed = False

    async def body(stop: asyncio.Event) -> None:
        nonlocal failed
        worker = Worker(cfg)
        await worker.app.start()
        try:
            waits = [asyncio.create_task(stop.wait()), asyncio.create_task(worker.failed.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            failed = worker.failed.is_set()
        finally:
            await worker.app.stop()

    asyncio.run(_until_signalled(body))
    if failed:
        print("worker stopped after a failure to publish; restart it to recover", file=sys.stderr)
        return 1
    return 0


async def _with_http(
    prefix: str,
    counters: object,
    port: int,
    run: Callable[[asyncio.Event], Awaitable[None]],
) -> None:
    """Serve /metrics, /healthz and /readyz (ready once `run` sets its event) around `run`."""
    from orch_worker.adapters.http import HealthServer
    from orch_worker.adapters.metrics import counters_registry

    ready = asyncio.Event()
    server = HealthServer(counters_registry(prefix, counters), ready.is_set, port)
    await server.start()
    try:
        await run(ready)
    finally:
        await server.stop()


def cmd_venue(args: argparse.Namespace) -> int:
    from orch_worker.adapters.kafka.venue_app import VenueCounters, run_venue

    cfg = _config(args, "venue")
    counters = VenueCounters()

    async def body(stop: asyncio.Event) -> None:
        await _with_http(
            "orch_venue",
            counters,
            cfg.venue.http_port,
            lambda ready: run_venue(cfg, stop=stop, ready=ready, counters=counters),
        )

    asyncio.run(_until_signalled(body))
    return 0


def cmd_sink(args: argparse.Namespace) -> int:
    from orch_worker.adapters.kafka.sink_app import SinkStats, run_sink

    cfg = _config(args, "sink")
    db = args.db or os.environ.get("ORCH_DB") or cfg.sink.db
    stats = SinkStats()

    async def body(stop: asyncio.Event) -> None:
        await _with_http(
            "orch_sink",
            stats,
            cfg.sink.http_port,
            lambda ready: run_sink(cfg, stop=stop, ready=ready, db_url=db, stats=stats),
        )

    asyncio.run(_until_signalled(body))
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from orch_worker.adapters.kafka.embedded import EmbeddedBroker

    broker = EmbeddedBroker(port=args.port)
    broker.start()
    print(broker.bootstrap, flush=True)
    print(
        f"embedded broker (memory only) on {broker.bootstrap}; "
        f"export ORCH_KAFKA_BOOTSTRAP={broker.bootstrap} ORCH_KAFKA_PROFILE=embedded; ^C stops it",
        file=sys.stderr,
        flush=True,
    )
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        broker.stop()
    return 0


# -- tools ---------------------------------------------------------------------------------


def cmd_publish(args: argparse.Namespace) -> int:
    from orch_worker.publish import publish_file

    cfg = _config(args)
    source = Path(args.file) if args.file and args.file != "-" else None
    from datetime import UTC, datetime

    count = asyncio.run(
        publish_file(
            cfg,
            args.topic,
            source,
            secret=(
                cfg.worker.control_secret.get_secret_value() if cfg.worker.control_secret else None
            ),
            now=datetime.now(UTC) if args.now else None,
        )
    )
    print(f"published {count} records to {args.topic}", file=sys.stderr)
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file, env={})
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    print(
        f"ok: {len(cfg.portfolios)} portfolios, {len(cfg.accounts)} accounts, "
        f"{len(cfg.instruments)} instruments"
    )
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from orch_worker.schemas import write_schemas

    written = write_schemas(Path(args.out))
    print(f"wrote {len(written)} schemas to {args.out}")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from orch_worker.audit_tools import verify_store

    report = verify_store(args.db)
    print(report.text())
    return 0 if report.ok else 1


def _when(text: str | None, flag: str) -> datetime | None:
    """An ISO 8601 time from the command line; no offset means UTC."""
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"{flag}: not an ISO 8601 time: {text!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def cmd_audit_prune(args: argparse.Namespace) -> int:
    from orch_worker.audit_tools import prune_cutoff, prune_store

    retention = None
    if args.config is not None:
        retention = load_config(args.config).sink.retention_days
    cutoff = prune_cutoff(_when(args.before, "--before"), retention, datetime.now(UTC))
    if cutoff is None:
        print(
            "nothing pruned: no --before and no sink.retention_days in --config "
            "(the default retention is to keep everything)",
            file=sys.stderr,
        )
        return 2
    result = prune_store(args.db, cutoff, dry_run=args.dry_run)
    verb = "would prune" if args.dry_run else "pruned"
    print(
        f"{verb} {len(result.signal_ids)} finished signals ({result.events} events) with every "
        f"event before {cutoff.isoformat()}; tombstones keep their place in the hash chain"
    )
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from orch_worker.adapters.db.store import open_store
    from orch_worker.replay import replay_signal

    # Only an explicit --config replaces the recorded one: $ORCH_CONFIG is today's setting and
    # would silently turn a reproduction into a what-if.
    override = load_config(args.config, env={}) if args.config else None
    with open_store(args.db) as store:
        text, status = replay_signal(store, args.signal_id, override)
    print(text)
    return status


def cmd_report(args: argparse.Namespace) -> int:
    from orch_worker.adapters.db.store import open_store
    from orch_worker.report import report_html

    since, until = _when(args.since, "--since"), _when(args.until, "--until")
    with open_store(args.db) as store:
        page, data = report_html(store, since, until)
    out = Path(args.out)
    out.write_text(page, encoding="utf-8")
    flagged = [c.name for c in data.checks if c.violations]
    print(
        f"wrote {out} ({len(data.signals)} signals, {data.releases} releases, {data.fills} fills"
        f"; compliance: {'flagged ' + ', '.join(flagged) if flagged else 'all checks pass'})"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from orch_worker.demo import run_demo

    # The demo's console is its progress and summary; the components' logs go to a file.
    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    file_handler = logging.FileHandler(workdir / "demo.log", mode="w", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(file_handler)
    print(f"component logs: {workdir / 'demo.log'}")
    return asyncio.run(run_demo(Path(args.dir), n_signals=args.signals, timeout_s=args.timeout))


# -- parser --------------------------------------------------------------------------------


def _with_kafka(p: argparse.ArgumentParser, *, http: bool = False) -> None:
    p.add_argument("--config", default=None, help="TOML configuration (default: $ORCH_CONFIG)")
    p.add_argument(
        "--bootstrap", default=None, help="Kafka host:port (default: $ORCH_KAFKA_BOOTSTRAP, config)"
    )
    if http:
        p.add_argument("--http-port", type=int, default=None, help="metrics/health port")


def _add_audit_tools(sub: Any, asub: Any) -> None:
    """`audit prune`, `replay` and `report`: the operator's tools over the audit store."""
    prune = asub.add_parser(
        "prune",
        help="delete whole finished signals older than a cutoff (retention), keeping tombstones",
    )
    prune.add_argument("--db", required=True)
    prune.add_argument("--before", default=None, help="ISO 8601 cutoff (no offset = UTC)")
    prune.add_argument(
        "--config", default=None, help="take the cutoff from sink.retention_days of this file"
    )
    prune.add_argument("--dry-run", action="store_true", help="only say what would be pruned")
    prune.set_defaults(func=cmd_audit_prune)

    replay = sub.add_parser(
        "replay", help="a signal's timeline, and its plan re-made from the recorded inputs"
    )
    replay.add_argument("signal_id")
    replay.add_argument("--db", required=True)
    replay.add_argument(
        "--config",
        default=None,
        help="plan with this configuration instead of the recorded one (what would it do today)",
    )
    replay.set_defaults(func=cmd_replay)

    report = sub.add_parser("report", help="self-contained HTML report of a time range")
    report.add_argument("--db", required=True)
    report.add_argument("--out", default="orch-report.html")
    report.add_argument("--since", default=None, help="ISO 8601; signals received from then")
    report.add_argument("--until", default=None, help="ISO 8601; signals received before then")
    report.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orch-worker", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="everything on one machine with no setup")
    demo.add_argument("--dir", default="orch-demo", help="where the audit database goes")
    demo.add_argument("--signals", type=int, default=8)
    demo.add_argument("--timeout", type=float, default=90.0)
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="the worker")
    _with_kafka(run, http=True)
    run.set_defaults(func=cmd_run)

    venue = sub.add_parser("venue", help="the paper venue (seeded simulated broker)")
    _with_kafka(venue, http=True)
    venue.set_defaults(func=cmd_venue)

    sink = sub.add_parser("sink", help="audit topic -> database")
    _with_kafka(sink, http=True)
    sink.add_argument("--db", default=None, help="sqlite:///path (default) or postgresql://...")
    sink.set_defaults(func=cmd_sink)

    broker = sub.add_parser("broker", help="the embedded broker alone; prints its address")
    broker.add_argument("--port", type=int, default=None)
    broker.set_defaults(func=cmd_broker)

    pub = sub.add_parser("publish", help="publish JSON or JSONL events to a topic")
    pub.add_argument("topic", help="signals, account-state, control, execution-reports, ...")
    pub.add_argument("file", nargs="?", default=None, help="JSON or JSONL file (default: stdin)")
    pub.add_argument(
        "--now",
        action="store_true",
        help="set each event's own timestamp (created_at, updated_at, issued_at) to now",
    )
    _with_kafka(pub)
    pub.set_defaults(func=cmd_publish)

    config = sub.add_parser("config", help="configuration tools")
    csub = config.add_subparsers(dest="config_command", required=True)
    check = csub.add_parser("check", help="validate a configuration file")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)

    schemas = sub.add_parser("schemas", help="write the JSON Schemas of every event")
    schemas.add_argument("--out", default="schemas")
    schemas.set_defaults(func=cmd_schemas)

    audit = sub.add_parser("audit", help="audit store tools")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    verify = asub.add_parser("verify", help="check the hash chain and completeness")
    verify.add_argument("--db", required=True)
    verify.set_defaults(func=cmd_audit_verify)
    _add_audit_tools(sub, asub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        result: Any = args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result)


if __name__ == "__main__":
    raise SystemExit(main())
