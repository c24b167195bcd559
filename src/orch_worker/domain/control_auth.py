"""Who may steer the orchestrator: HMAC-signed, fresh, never-seen control commands.

When a control secret is configured, a command is acted on only if its signature is the
HMAC-SHA256 of its canonical JSON (without the signature) under that secret, it was issued
recently (a captured command cannot be replayed later) and its id has not been applied before.
Pure: the secret, the clock and the seen ids are arguments.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Container
from datetime import datetime

from orch_worker.domain.models import ControlCommand


def signature(cmd: ControlCommand, secret: bytes) -> str:
    return hmac.new(secret, cmd.signing_payload(), hashlib.sha256).hexdigest()


def refusal(
    cmd: ControlCommand,
    secret: bytes,
    now: datetime,
    *,
    max_age_s: float,
    max_skew_s: float,
    seen: Container[str],
) -> tuple[str, str] | None:
    """(error_type, reason) when the command must be refused, None when it may be applied."""
    if cmd.signature is None:
        return "unauthorized", "control command is not signed and a control secret is configured"
    if not hmac.compare_digest(cmd.signature, signature(cmd, secret)):
        return "unauthorized", "control command signature does not match"
    age = (now - cmd.issued_at).total_seconds()
    if age > max_age_s:
        return "replayed", f"control command issued {age:.0f}s ago, older than {max_age_s:.0f}s"
    if -age > max_skew_s:
        return "unauthorized", f"control command issued {-age:.0f}s in the future"
    if cmd.command_id in seen:
        return "replayed", f"control command {cmd.command_id} was already applied"
    return None
