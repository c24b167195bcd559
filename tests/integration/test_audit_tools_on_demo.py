"""The audit tools on a real demo run's database: verify, tamper, replay, report, prune.

One `orch-worker demo --signals 4` (embedded broker, worker, paper venue, sink) per module makes
the database; every test works on its own copy so a tampered or pruned copy never leaks into
another test. The report's numbers are recomputed here straight from SQL (`json_extract` over
the stored rows) and compared with what the page shows, so the page cannot drift from the data.
"""

from __future__ import annotations

import html.parser
import os
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "orch_worker.cli"]
SIGNALS = 4


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("demo")
    done = cli("demo", "--dir", str(workdir), "--signals", str(SIGNALS), timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return workdir / "audit.db"


@pytest.fixture
def db(demo_db: Path, tmp_path: Path) -> Path:
    """A private copy of the demo database (WAL checkpointed, so one file holds everything)."""
    with sqlite3.connect(demo_db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    copy = tmp_path / "audit.db"
    shutil.copyfile(demo_db, copy)
    return copy


def url(path: Path) -> str:
    return f"sqlite:///{path}"


def sql(path: Path, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(statement, params).fetchall()


def signal_ids(path: Path) -> list[str]:
    rows = sql(path, "SELECT signal_id FROM audit_events WHERE type = 'signal_received'")
    return sorted(str(r[0]) for r in rows)


# -- verify --------------------------------------------------------------------------------------


def test_verify_passes_on_the_demo_database(db: Path) -> None:
    done = cli("audit", "verify", "--db", url(db))

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("OK:")
    assert f"{SIGNALS} signals" in done.stdout


def test_verify_fails_on_an_edited_row_and_names_the_first_broken_link(db: Path) -> None:
    [(event_id, seq)] = sql(
        db,
        "SELECT event_id, seq FROM audit_events WHERE type = 'plan_created' ORDER BY seq LIMIT 1",
    )
    later = sql(db, "SELECT event_id FROM audit_events WHERE type = 'intent_released' LIMIT 1")
    with sqlite3.connect(db) as conn:  # two edits: only the earlier one is the first break
        conn.execute(
            "UPDATE audit_events SET rationale = rationale || ' (edited)' WHERE event_id = ?",
            (event_id,),
        )
        conn.execute(
            "UPDATE audit_events SET data = json_set(data, '$.quantity', '99') WHERE event_id = ?",
            (later[0][0],),
        )

    done = cli("audit", "verify", "--db", url(db))

    assert done.returncode == 1
    assert f"first break at seq {seq} ({event_id}): hash does not match" in done.stdout


def test_verify_fails_on_a_deleted_row(db: Path) -> None:
    [(seq,)] = sql(db, "SELECT max(seq) / 2 FROM audit_events")
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit_events WHERE seq = ?", (seq,))

    done = cli("audit", "verify", "--db", url(db))

    assert done.returncode == 1
    assert f"seq {int(str(seq)) + 1}: expected seq {seq}" in done.stdout


# -- replay --------------------------------------------------------------------------------------


def test_replay_reproduces_the_plan_of_every_demo_signal(db: Path) -> None:
    ids = signal_ids(db)
    assert len(ids) == SIGNALS

    for signal_id in ids:
        done = cli("replay", signal_id, "--db", url(db))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "replay: SAME plan" in done.stdout
        assert "plan_created" in done.stdout
        assert "result:" in done.stdout


def test_replay_names_every_field_that_differs_and_exits_non_zero(db: Path) -> None:
    signal_id = signal_ids(db)[0]
    [(event_id,)] = sql(
        db,
        "SELECT event_id FROM audit_events WHERE type = 'plan_created' AND signal_id = ?",
        (signal_id,),
    )
    account = sql(
        db,
        "SELECT json_extract(data, '$.plan.allocations[0].account_id') FROM audit_events "
        "WHERE event_id = ?",
        (event_id,),
    )[0][0]
    with sqlite3.connect(db) as conn:  # the record now claims a different size
        conn.execute(
            "UPDATE audit_events SET data = json_set(data, '$.plan.allocations[0].quantity',"
            " '7.77') WHERE event_id = ?",
            (event_id,),
        )

    done = cli("replay", signal_id, "--db", url(db))

    assert done.returncode == 1, done.stdout
    assert "DIFFERENT plan, 1 fields differ" in done.stdout
    assert f"plan.allocations[{account}].quantity: recorded 7.77, replay" in done.stdout


def test_replay_with_another_configuration_shows_what_it_would_change(
    db: Path, tmp_path: Path
) -> None:
    from importlib import resources

    toml = (resources.files("orch_worker") / "demo.toml").read_text(encoding="utf-8")
    assert 'allocation = "equal"' in toml
    other = tmp_path / "equity.toml"
    other.write_text(toml.replace('allocation = "equal"', 'allocation = "equity"'))

    done = cli("replay", signal_ids(db)[0], "--db", url(db), "--config", str(other))

    assert done.returncode == 1
    assert "configuration: given file" in done.stdout
    assert "changed since the record: config.portfolios.demo.allocation" in done.stdout
    assert "plan.method: recorded equal, replay equity" in done.stdout


def test_replay_of_an_unknown_signal_says_so(db: Path) -> None:
    done = cli("replay", "no-such-signal", "--db", url(db))

    assert done.returncode == 2
    assert "no events" in done.stdout


# -- report --------------------------------------------------------------------------------------


class _Metrics(html.parser.HTMLParser):
    """Collects every element with `data-metric` (or `data-check`) and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[tuple[str, ...], str] = {}
        self.checks: dict[str, dict[str, str]] = {}
        self._open: tuple[str, ...] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "data-check" in a:
            self.checks[a["data-check"]] = a
        if "data-metric" in a:
            keys = tuple(f"{k}={v}" for k, v in sorted(a.items()) if k.startswith("data-"))
            assert keys not in self.metrics, f"two elements claim {keys}"
            self.metrics[keys] = ""
            self._open = keys

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self.metrics[self._open] += data

    def handle_endtag(self, tag: str) -> None:
        self._open = None

    def get(self, metric: str, **keys: str) -> str:
        wanted = [f"data-metric={metric}", *(f"data-{k}={v}" for k, v in keys.items())]
        return self.metrics[tuple(sorted(wanted))]


def _report(db: Path, tmp_path: Path, *extra: str) -> _Metrics:
    out = tmp_path / "report.html"
    done = cli("report", "--db", url(db), "--out", str(out), *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    parser = _Metrics()
    parser.feed(out.read_text(encoding="utf-8"))
    return parser


def _dec_sums(rows: list[tuple[object, ...]]) -> dict[str, Decimal]:
    out: defaultdict[str, Decimal] = defaultdict(Decimal)
    for account, value in rows:
        out[str(account)] += Decimal(str(value))
    return dict(out)


def test_report_numbers_match_the_database(db: Path, tmp_path: Path) -> None:
    page = _report(db, tmp_path)

    count = sql(db, "SELECT count(*) FROM audit_events WHERE type = 'signal_received'")[0][0]
    releases = sql(db, "SELECT count(*) FROM audit_events WHERE type = 'intent_released'")[0][0]
    fills = sql(
        db,
        "SELECT count(*) FROM audit_events WHERE type = 'intent_transition'"
        " AND CAST(json_extract(data, '$.fill_delta') AS REAL) > 0"
        " AND json_extract(data, '$.last_price') IS NOT NULL",
    )[0][0]
    assert (page.get("signals"), page.get("releases"), page.get("fills")) == (
        str(count),
        str(releases),
        str(fills),
    )
    statuses = sql(db, "SELECT status, count(*) FROM signals GROUP BY status")
    for status, n in statuses:
        assert page.get("signal_status", status=str(status)) == str(n)

    planned = _dec_sums(
        sql(
            db,
            "SELECT json_extract(a.value, '$.account_id'), json_extract(a.value, '$.quantity')"
            " FROM audit_events e, json_each(e.data, '$.plan.allocations') a"
            " WHERE e.type = 'plan_created'",
        )
    )
    released = _dec_sums(
        sql(
            db,
            "SELECT account_id, json_extract(data, '$.intent.quantity') FROM audit_events"
            " WHERE type = 'intent_released'",
        )
    )
    filled = _dec_sums(
        sql(
            db,
            "SELECT account_id, json_extract(data, '$.fill_delta') FROM audit_events"
            " WHERE type = 'intent_transition' AND json_extract(data, '$.last_price') IS NOT NULL",
        )
    )
    assert planned, "the demo plans something"
    for account, q in planned.items():
        assert Decimal(page.get("planned", account=account)) == q
    for account, q in released.items():
        assert Decimal(page.get("released", account=account)) == q
        got = filled.get(account, Decimal(0))
        assert Decimal(page.get("filled", account=account)) == got
        rate = page.get("fill_rate", account=account)
        assert float(rate) == pytest.approx(float(got / q), abs=1e-4)

    failures = sql(
        db,
        "SELECT json_extract(data, '$.reason_code'), count(*) FROM audit_events"
        " WHERE type = 'intent_transition' AND json_extract(data, '$.reason_code') IS NOT NULL"
        " AND json_extract(data, '$.outcome') = 'applied' GROUP BY 1",
    )
    for reason, n in failures:
        assert page.get("failures", reason=str(reason)) == str(n)
    exclusions: Counter[str] = Counter(
        str(r[0]).split(":", 1)[0]
        for r in sql(
            db,
            "SELECT r.value FROM audit_events e, json_each(e.data, '$.reasons') r"
            " WHERE e.type = 'account_excluded'",
        )
    )
    assert exclusions, "the demo excludes its suspended account"
    for code, n in exclusions.items():
        assert page.get("exclusions", reason=code) == str(n)
    excluded: Counter[str] = Counter(
        str(r[0])
        for r in sql(db, "SELECT account_id FROM audit_events WHERE type = 'account_excluded'")
    )
    for account, n in excluded.items():
        assert page.get("excluded", account=account) == str(n)

    headroom: defaultdict[str, list[Decimal]] = defaultdict(list)
    for account, cap, quantity in sql(
        db,
        "SELECT json_extract(a.value, '$.account_id'), json_extract(a.value, '$.numbers.cap'),"
        " json_extract(a.value, '$.quantity')"
        " FROM audit_events e, json_each(e.data, '$.plan.allocations') a"
        " WHERE e.type = 'plan_created'",
    ):
        headroom[str(account)].append(Decimal(str(cap)) - Decimal(str(quantity)))
    for account, rooms in headroom.items():
        assert Decimal(page.get("headroom_min", account=account)) == min(rooms)


def test_report_rotation_and_delays_match_the_database(db: Path, tmp_path: Path) -> None:
    page = _report(db, tmp_path)
    plan_ts = {
        str(sid): str(ts)
        for sid, ts in sql(db, "SELECT signal_id, ts FROM audit_events WHERE type = 'plan_created'")
    }
    rows = sql(
        db,
        "SELECT signal_id, account_id, json_extract(data, '$.intent.released_at'),"
        " json_extract(data, '$.intent.scheduled_at'), seq, json_extract(data, '$.intent.kind')"
        " FROM audit_events WHERE type = 'intent_released'",
    )
    by_signal: defaultdict[str, list[tuple[str, str, int]]] = defaultdict(list)
    delays, lags = [], []
    for signal_id, account, released_at, scheduled_at, seq, kind in rows:
        if kind == "initial":  # rotation: who went first among the signal's initial releases
            by_signal[str(signal_id)].append((str(released_at), str(account), int(str(seq))))
        if kind == "cancel":
            continue
        released = datetime.fromisoformat(str(released_at))
        lags.append((released - datetime.fromisoformat(str(scheduled_at))).total_seconds())
        planned = datetime.fromisoformat(plan_ts[str(signal_id)])
        delays.append((released - planned).total_seconds())
    first = Counter(min(v, key=lambda r: (r[0], r[2]))[1] for v in by_signal.values())
    for account, n in first.items():
        assert page.get("first", account=account) == str(n)

    assert page.get("delay_count") == str(len(delays))
    assert float(page.get("delay_max_s")) == pytest.approx(max(delays), abs=1e-3)
    assert float(page.get("lag_max_s")) == pytest.approx(max(lags), abs=1e-3)


def test_report_compliance_finds_every_release_inside_its_plan(db: Path, tmp_path: Path) -> None:
    page = _report(db, tmp_path)
    releases = sql(db, "SELECT count(*) FROM audit_events WHERE type = 'intent_released'")[0][0]

    check = page.checks["releases_within_plan"]
    assert (check["data-checked"], check["data-violations"]) == (str(releases), "0")
    assert {"no_cross_account_hedge", "rotation_fairness"} <= set(page.checks)


def test_report_time_range_takes_whole_signals_by_arrival(db: Path, tmp_path: Path) -> None:
    received = sql(db, "SELECT ts FROM audit_events WHERE type = 'signal_received' ORDER BY ts")
    last = str(received[-1][0])

    assert _report(db, tmp_path, "--since", last).get("signals") == str(
        sum(1 for (ts,) in received if str(ts) >= last)
    )
    assert _report(db, tmp_path, "--until", "2000-01-01T00:00:00").get("signals") == "0"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
)


def test_report_renders_in_headless_chromium_without_errors(db: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (make test installs it with apt-get when root)")
    out = tmp_path / "report.html"
    assert cli("report", "--db", url(db), "--out", str(out)).returncode == 0
    page = out.read_text(encoding="utf-8")
    assert "<script" not in page.lower(), "the report needs no script"
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page, "the report loads nothing from outside"

    png = tmp_path / "report.png"
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"]
    shot = subprocess.run(
        [*common, f"--screenshot={png}", "--window-size=1280,2000", out.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    dom = subprocess.run(
        [*common, "--dump-dom", out.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert shot.returncode == 0, shot.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000, "a blank page compresses to almost nothing"
    logs = shot.stderr + dom.stderr
    console = [line for line in logs.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Compliance" in dom.stdout
    assert dom.stdout.count("<svg") >= 6, "every plot rendered into the DOM"
    keep = os.environ.get("ORCH_REPORT_SCREENSHOT")
    if keep:  # where a person (or CI) wants to look at it
        shutil.copyfile(png, keep)


# -- retention -----------------------------------------------------------------------------------


def test_prune_keeps_the_chain_verifiable_and_refuses_without_a_policy(db: Path) -> None:
    total = sql(db, "SELECT count(*) FROM audit_events")[0][0]

    refused = cli("audit", "prune", "--db", url(db))
    assert refused.returncode == 2
    assert "keep everything" in refused.stderr
    assert sql(db, "SELECT count(*) FROM audit_events")[0][0] == total

    config = db.parent / "retention.toml"
    config.write_text("[sink]\nretention_days = 1\n")
    kept_by_policy = cli("audit", "prune", "--db", url(db), "--config", str(config))
    assert kept_by_policy.returncode == 0, kept_by_policy.stderr
    assert "pruned 0 finished signals" in kept_by_policy.stdout  # the demo ran just now

    dry = cli("audit", "prune", "--db", url(db), "--before", "2999-01-01", "--dry-run")
    assert dry.returncode == 0
    assert f"would prune {SIGNALS} finished signals" in dry.stdout
    assert sql(db, "SELECT count(*) FROM audit_events")[0][0] == total

    done = cli("audit", "prune", "--db", url(db), "--before", "2999-01-01")
    assert done.returncode == 0, done.stderr
    assert f"pruned {SIGNALS} finished signals" in done.stdout
    kept = sql(db, "SELECT count(*) FROM audit_events")[0][0]
    tombstones = sql(db, "SELECT count(*) FROM pruned")[0][0]
    assert kept + tombstones == total  # nothing vanished without a trace
    assert sql(db, "SELECT count(*) FROM signals")[0][0] == 0

    verified = cli("audit", "verify", "--db", url(db))
    assert verified.returncode == 0, verified.stdout
    assert f"{tombstones} pruned events accounted for" in verified.stdout

    with sqlite3.connect(db) as conn:  # a tombstone's hash must still link to the next event
        conn.execute("UPDATE pruned SET hash = ? WHERE seq = 2", ("0" * 64,))
    broken = cli("audit", "verify", "--db", url(db))
    assert broken.returncode == 1
    assert "first break at seq 3" in broken.stdout
    assert "prev_hash does not match" in broken.stdout
