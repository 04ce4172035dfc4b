"""Restricted mode end to end: a compromised runner (it holds the per-call key, as any runner does) signs a
result whose pickle would create a canary directory when loaded. ``@task(restricted=True)`` must refuse it
by name and never run it; plain mode, the contrast, runs it (it trusts the host, as documented).

The payload only ever creates an empty directory under this test's temporary directory. rx runs in this
process, with ``Coordinator.backend`` wrapped by :mod:`test_integrity`'s tampering backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from faultkit import SCENARIOS, Rig, TrialFactory, audit_remote, remote_baseline
from test_integrity import ForgedResult, Mutator, tamper, task_entries  # noqa: F401 - tamper: the fixture `forging` uses

from remote_exec import task
from remote_exec.errors import RemoteExecError, SerializationError
from testbed import TestbedHost

HOST = "rx-testbed-1"

SCENARIOS.update({
    "restricted_forged": {
        "class": "corrupted or malicious results",
        "title": "Restricted mode: forged pickle",
        "fault": "a compromised runner signs a result whose value (V) or exception (X) pickle calls os.mkdir "
                 "on a canary path when loaded",
        "expect": "restricted=True: SerializationError naming the refused global (posix.mkdir) for a value, the "
                  "text form for an exception; the canary never appears; restricted=False (contrast) runs it",
    },
})


class MkdirOnLoad:
    """Pickles as ``os.mkdir(path)``: loading it creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return (os.mkdir, (self.path,))


class ForgePickle(ForgedResult):
    """A forged result whose value (``V``) or exception (``X``) pickle is ``payload``."""

    def __init__(self, payload: bytes, kind: bytes) -> None:
        self.payload = payload
        self.kind = kind

    def forge(self, header: dict[str, Any]) -> list[tuple[bytes, bytes]]:
        digest = {"size": len(self.payload), "sha256": hashlib.sha256(self.payload).hexdigest()}
        header.update(files=[], value=None, exc_pickle=None)
        if self.kind == b"V":
            header.update(status="finished", exit_code=0, value=digest, exception=None)
        else:
            header.update(status="raised", exit_code=1, exc_pickle=digest, exception={
                "type": "ValueError", "message": "forged",
                "traceback": "Traceback (most recent call last):\n  File \"<forged>\", line 1\nValueError: forged\n"})
        return [(b"R", json.dumps(header).encode()), (self.kind, self.payload)]


@pytest.fixture
def forging(request: pytest.FixtureRequest) -> Callable[[Mutator], None]:
    """``forging(mutator)``: rx's next calls in this process go through a tampering backend (the
    integrity suite's ``tamper``, imported above, which finds the per-call key also when the G frame
    shares its write)."""
    use: Callable[[Mutator], None] = request.getfixturevalue("tamper")
    return use


@dataclass(frozen=True)
class Case:
    """One variant: which frame carries the payload and the task's options."""

    kind: bytes
    options: dict[str, Any]

    @property
    def restricted(self) -> bool:
        return bool(self.options.get("restricted"))


CASES = {
    "value, restricted": Case(b"V", {"restricted": True}),
    "value, restricted, allow_unpickle=['pathlib']": Case(b"V", {"restricted": True, "allow_unpickle": ["pathlib"]}),
    "exception, restricted": Case(b"X", {"restricted": True}),
    "value, restricted=False (contrast)": Case(b"V", {}),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", list(CASES))
def test_restricted_forged_pickle_is_refused(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory,
                                            forging: Callable[[Mutator], None], variant: str) -> None:
    case = CASES[variant]
    canary = rig.root / f"canary-{secrets.token_hex(4)}"
    forge = ForgePickle(pickle.dumps(MkdirOnLoad(canary), protocol=5), case.kind)
    forging(forge)
    baseline = remote_baseline(testbed_host)

    with trial("restricted_forged", variant=variant, bound=30.0) as t:
        honest = task(remote=HOST, **case.options)(lambda: 42)
        started = time.monotonic()
        error: RemoteExecError | Exception | None = None
        value: Any = "not returned"
        try:
            value = honest()
        except Exception as exc:  # what the caller gets is the observation
            error = exc
        t.timed(time.monotonic() - started)
        ran = canary.exists()
        entries = task_entries(rig)
        t.outcome = (f"{type(error).__name__}: {error}"[:200] if error else f"returned {value!r}") + (
            "; payload ran (canary created)" if ran else "; canary absent")
        if case.restricted:
            t.note(injections=int(ran), unpickle_refused=isinstance(error, SerializationError))
        else:
            t.note(payload_ran=ran)
        t.note(task_status=[entry.get("status") for entry in entries])
        t.audit(audit_remote(testbed_host, baseline))

        assert forge.sent, "the forgery never applied"
        if not case.restricted:
            # The contrast: the forged result passed every check and plain pickle ran it.
            assert ran and value is None and error is None, (ran, value, error)
            return
        assert not ran, "restricted mode ran the forged pickle"
        if case.kind == b"V":
            assert isinstance(error, SerializationError), error
            assert "posix.mkdir" in str(error), str(error)
            assert [entry["status"] for entry in entries] == ["failed"], entries
        else:  # an exception that cannot be rebuilt arrives as its text
            assert isinstance(error, Exception) and "forged" in str(error), error
            assert not isinstance(error, SerializationError), error
        assert t.facts["orphans"] == 0 and t.facts["leftover_files"] == 0, t.facts
