"""Configuration: every wrong key is named, env overrides apply, the demo file is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from orch_worker.cli import main
from orch_worker.settings import ConfigError, load_config

DEMO = Path(__file__).resolve().parents[2] / "src" / "orch_worker" / "demo.toml"


def test_demo_configuration_is_valid() -> None:
    cfg = load_config(DEMO, env={})
    assert set(cfg.accounts) == {f"ACC-{i}" for i in range(1, 6)}
    assert cfg.rules_for("ACC-4").max_open_positions == 5
    assert cfg.rules_for("ACC-1").max_open_positions == 3


def test_every_wrong_key_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[kafka]\nbootstrapp = "x:1"\n[portfolios.p]\nallocation = "magic"\n'
        '[accounts.A]\nportfolio = "p"\nratoi = "2"\n[venue]\nseed = "abc"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(bad, env={})
    text = str(err.value)
    for expected in (
        "kafka.bootstrapp: unknown key",
        "portfolios.p.allocation",
        "accounts.A.ratoi: unknown key",
        "venue.seed",
    ):
        assert expected in text


def test_unknown_portfolio_reference_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[accounts.A]\nportfolio = "nope"\n')
    with pytest.raises(ConfigError, match="unknown portfolio 'nope'"):
        load_config(bad, env={})


def test_environment_overrides_single_values() -> None:
    cfg = load_config(
        DEMO, env={"ORCH_KAFKA_BOOTSTRAP": "h:1", "ORCH_WORKER_MAX_SIGNAL_AGE_S": "12"}
    )
    assert cfg.kafka.bootstrap == "h:1"
    assert cfg.worker.max_signal_age_s == 12


def test_config_check_command_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check", str(DEMO)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[kafka]\nnope = 1\n")
    assert main(["config", "check", str(bad)]) == 1
    assert "kafka.nope: unknown key" in capsys.readouterr().err
