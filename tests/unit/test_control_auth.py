"""Control commands under a secret: signed, fresh and new, or refused with the reason."""

from __future__ import annotations

from datetime import timedelta

from orch_worker.domain.control_auth import refusal, signature
from orch_worker.domain.models import ControlCommand
from orch_worker.publish import sign
from tests import factories as f

SECRET = b"s3cret-key"


def signed(cmd: ControlCommand, secret: bytes = SECRET) -> ControlCommand:
    return cmd.model_copy(update={"signature": signature(cmd, secret)})


def check(cmd: ControlCommand, *, at_s: float = 1, seen: tuple[str, ...] = ()) -> object:
    return refusal(
        cmd, SECRET, f.NOW + timedelta(seconds=at_s), max_age_s=300, max_skew_s=30, seen=seen
    )


def test_a_signed_fresh_new_command_is_accepted() -> None:
    assert check(signed(f.control("c1", "halt", portfolio="demo"))) is None


def test_unsigned_and_wrongly_signed_commands_are_unauthorized() -> None:
    cmd = f.control("c1", "halt", portfolio="demo")
    assert check(cmd) == (
        "unauthorized",
        "control command is not signed and a control secret is configured",
    )
    forged = signed(cmd, b"another key")
    assert check(forged) == ("unauthorized", "control command signature does not match")


def test_a_signature_covers_every_field() -> None:
    good = signed(f.control("c1", "pause_account", account_id="ACC-1"))
    tampered = good.model_copy(update={"account_id": "ACC-2"})
    assert check(tampered) == ("unauthorized", "control command signature does not match")


def test_old_and_seen_commands_are_replays() -> None:
    cmd = signed(f.control("c1", "halt", portfolio="demo"))
    assert check(cmd, at_s=301) == (
        "replayed",
        "control command issued 301s ago, older than 300s",
    )
    assert check(cmd, seen=("c1",)) == ("replayed", "control command c1 was already applied")
    assert check(cmd, at_s=-31) is not None


def test_publish_signs_what_the_worker_verifies() -> None:
    doc = f.control("c9", "resume", portfolio="demo").model_dump(mode="json")
    cmd = ControlCommand.model_validate(sign(doc, SECRET.decode()))
    assert check(cmd) is None
