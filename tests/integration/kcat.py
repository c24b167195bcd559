"""kcat, the independent Kafka client of the end-to-end test: find it, run it, read its output.

Why kcat: a test written only with aiokafka could pass while the worker speaks a dialect only
aiokafka understands. kcat (librdkafka, C) is what an operator would use to publish a signal
or read the results, so the contract is checked through it.

Why a helper: Debian's kcat links librdkafka 2.0.2, which cannot talk to the embedded Tansu
broker ("Read underflow"). The confluent-kafka wheel ships a current librdkafka, so kcat runs
with `LD_LIBRARY_PATH` pointing at a directory whose `librdkafka.so.1` is a symlink to it.

Why murmur2: librdkafka's default partitioner (CRC32) puts a key on a different partition than
the Java client and aiokafka (murmur2) do. Keys are how records of one portfolio stay on one
partition, so kcat is told to use murmur2 like every other producer in the system.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

PARTITIONER = "murmur2_random"
"""The Java client's partitioner (murmur2; random only for null keys), as aiokafka uses."""


class KcatError(AssertionError):
    """kcat failed or did not see what was expected in time (an assertion error for pytest)."""


@dataclass(frozen=True, slots=True)
class KcatRecord:
    """One record as kcat's JSON envelope (`-J`) reports it."""

    topic: str
    partition: int
    offset: int
    key: str | None
    payload: str | None

    def value(self) -> Any:
        """The payload decoded as JSON (every public topic carries JSON)."""
        if self.payload is None:
            raise KcatError(f"tombstone at {self.topic}[{self.partition}]@{self.offset}")
        return orjson.loads(self.payload)


def find_kcat() -> str | None:
    """The kcat binary on PATH (Debian's package; `make kcat` installs it), or None."""
    return shutil.which("kcat")


def wheel_librdkafka() -> Path | None:
    """The librdkafka that ships inside the installed confluent-kafka wheel, if there is one.

    `find_spec` locates the package without importing it, so this works even where importing
    confluent_kafka would fail for an unrelated reason.
    """
    spec = importlib.util.find_spec("confluent_kafka")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        libs = sorted(Path(location).parent.glob("confluent_kafka.libs/librdkafka*.so*"))
        if libs:
            return libs[-1]
    return None


class Kcat:
    """Runs kcat against one bootstrap address, with a librdkafka that speaks to the broker."""

    def __init__(self, binary: str, bootstrap: str, libdir: Path | None) -> None:
        self.binary = binary
        self.bootstrap = bootstrap
        self.libdir = libdir

    @classmethod
    def create(cls, binary: str, bootstrap: str, workdir: Path) -> Kcat:
        """Build the library directory under `workdir` (a test's tmp_path) and the runner.

        Without the confluent-kafka wheel kcat runs with its own librdkafka: enough for a real
        Kafka, not for the embedded broker (the test then fails with kcat's error, not a hang).
        """
        lib = wheel_librdkafka()
        if lib is None:
            return cls(binary, bootstrap, None)
        libdir = workdir / "kcat-lib"
        libdir.mkdir(parents=True, exist_ok=True)
        link = libdir / "librdkafka.so.1"
        if not link.exists():
            link.symlink_to(lib)
        return cls(binary, bootstrap, libdir)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.libdir is not None:
            previous = env.get("LD_LIBRARY_PATH")
            env["LD_LIBRARY_PATH"] = f"{self.libdir}:{previous}" if previous else str(self.libdir)
        return env

    async def _run(
        self, args: list[str], stdin: bytes | None = None, timeout_s: float = 20.0
    ) -> tuple[bytes, bytes]:
        proc = await asyncio.create_subprocess_exec(
            self.binary,
            *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise KcatError(f"kcat {' '.join(args)} did not finish within {timeout_s}s") from None
        if proc.returncode != 0:
            detail = err.decode(errors="replace")
            raise KcatError(f"kcat {' '.join(args)} exited with {proc.returncode}: {detail}")
        return out, err

    async def librdkafka_version(self) -> str:
        """The librdkafka kcat actually loaded (`kcat -V`), to show in failures and reports."""
        out, _ = await self._run(["-V"])
        found = re.search(r"librdkafka ([0-9][0-9.]*)", out.decode(errors="replace"))
        return found.group(1) if found else "unknown"

    async def produce(
        self, topic: str, lines: Iterable[str], *, delimiter: str = "|", timeout_s: float = 20.0
    ) -> None:
        """Publish `key<delimiter>value` lines, keyed, and return once kcat has flushed them.

        The key is split off at the first delimiter, so JSON values may contain it.
        """
        body = "".join(f"{line}\n" for line in lines).encode()
        args = ["-P", "-b", self.bootstrap, "-t", topic, "-K", delimiter]
        args += ["-X", f"topic.partitioner={PARTITIONER}", "-X", "acks=all"]
        await self._run(args, stdin=body, timeout_s=timeout_s)

    async def consume(
        self,
        topic: str,
        until: Callable[[list[KcatRecord]], bool],
        *,
        timeout_s: float = 30.0,
    ) -> list[KcatRecord]:
        """Read `topic` from the beginning, streaming, until `until(records)` holds.

        One kcat process follows the topic instead of re-running `kcat -e`: the embedded
        broker's end offsets can be wrong after multi-record batches, and `-e` stops at them.
        """
        args = ["-C", "-b", self.bootstrap, "-t", topic, "-o", "beginning", "-J", "-u", "-q"]
        proc = await asyncio.create_subprocess_exec(
            self.binary,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            limit=16 * 1_048_576,
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        errors = asyncio.create_task(proc.stderr.read())  # drained so kcat never blocks on it
        records: list[KcatRecord] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while not until(records):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise KcatError(self._timeout_message(topic, timeout_s, records))
                try:
                    line = await asyncio.wait_for(proc.stdout.readline(), remaining)
                except TimeoutError:
                    raise KcatError(self._timeout_message(topic, timeout_s, records)) from None
                if not line:
                    await proc.wait()
                    err = await errors
                    raise KcatError(
                        f"kcat stopped reading {topic} (exit {proc.returncode}): "
                        f"{err.decode(errors='replace')}"
                    )
                records.append(_record(orjson.loads(line)))
            return records
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            errors.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await errors

    @staticmethod
    def _timeout_message(topic: str, timeout_s: float, records: list[KcatRecord]) -> str:
        tail = [r.payload for r in records[-5:]]
        return f"kcat saw {len(records)} records on {topic} in {timeout_s}s; last: {tail}"


def _record(envelope: dict[str, Any]) -> KcatRecord:
    return KcatRecord(
        topic=envelope["topic"],
        partition=int(envelope["partition"]),
        offset=int(envelope["offset"]),
        key=envelope.get("key"),
        payload=envelope.get("payload"),
    )
