"""Finished signals leave memory after lingering, and a redelivery is still a duplicate."""

from __future__ import annotations

from datetime import timedelta

from orch_worker.domain.config import OrchConfig
from orch_worker.domain.decider import forget_finished
from orch_worker.domain.models import ResultStatus
from tests import factories as f
from tests.unit.execution_helpers import Run, config


def _worker(cfg: OrchConfig, **worker: float) -> OrchConfig:
    return cfg.model_copy(update={"worker": cfg.worker.model_copy(update=worker)})


def filled_run(**worker: float) -> Run:
    run = Run(_worker(config(), **worker))
    run.signal()
    for account in ("ACC-1", "ACC-2", "ACC-3"):
        it = run.last(account)
        run.at(1).report(it, "filled", str(it.intent.quantity))
    assert run.status() is ResultStatus.COMPLETED
    return run


def test_a_finished_signal_records_when_it_finished_and_keeps_that_time() -> None:
    run = filled_run()
    assert run.st().finished_at == f.NOW + timedelta(seconds=1)
    run.at(5).report(run.last("ACC-1"), "filled", str(run.last("ACC-1").intent.quantity))
    assert run.st().finished_at == f.NOW + timedelta(seconds=1)  # a duplicate changes nothing


def test_a_finished_signal_is_forgotten_after_lingering_and_its_id_kept() -> None:
    run = filled_run(finished_linger_s=60, max_signal_age_s=300)

    kept, gone = forget_finished(run.pf, f.NOW + timedelta(seconds=60), run.cfg)
    assert gone == ()
    assert kept is run.pf

    later, gone = forget_finished(run.pf, f.NOW + timedelta(seconds=61), run.cfg)
    assert [st.signal.signal_id for st in gone] == ["sig-1"]
    assert "sig-1" not in later.signals
    assert later.forgotten == {"sig-1": run.st().signal.created_at}


def test_a_redelivered_forgotten_signal_is_a_duplicate() -> None:
    run = filled_run(finished_linger_s=60, max_signal_age_s=300)
    run.pf, _ = forget_finished(run.pf, f.NOW + timedelta(seconds=61), run.cfg)

    d = run.at(62).signal()

    assert d.outcome == "duplicate"
    assert not d.has_outputs


def test_a_forgotten_id_is_dropped_once_any_copy_would_be_stale() -> None:
    run = filled_run(finished_linger_s=60, max_signal_age_s=300)
    run.pf, _ = forget_finished(run.pf, f.NOW + timedelta(seconds=61), run.cfg)

    run.pf, _ = forget_finished(run.pf, f.NOW + timedelta(seconds=301), run.cfg)
    assert run.pf.forgotten == {}

    d = run.at(301).signal()
    assert d.outcome == "rejected"
    assert "STALE" in run.st().reason


def test_an_open_signal_or_an_open_intervention_is_never_forgotten() -> None:
    run = Run(_worker(config(execution={"ack_timeout_s": 10}), finished_linger_s=0))
    run.signal()
    _, gone = forget_finished(run.pf, f.NOW + timedelta(days=1), run.cfg)
    assert gone == ()  # still executing

    run.at(10).due()  # no report: unknown outcome, escalated to an operator
    assert run.st().open_interventions
    _, gone = forget_finished(run.pf, f.NOW + timedelta(days=1), run.cfg)
    assert gone == ()
