"""Why a call's result did not come: the host's own account of a project it could not store comes before the
upload error it caused (remote_exec.protocol.call._no_result_error)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from remote_exec.errors import SyncError
from remote_exec.protocol import wire
from remote_exec.protocol.call import _no_result_error


def _call(code: int, tail: str, tree_error: str | None) -> Any:
    process = SimpleNamespace(wait=lambda timeout: code)
    channel = SimpleNamespace(process=process, stderr_tail=lambda: tail)
    tree = SimpleNamespace(join=lambda timeout: None, error=tree_error, requested=True)
    return SimpleNamespace(channel=channel, host="gpu1", options=SimpleNamespace(), tree=tree)


@pytest.mark.parametrize(("tail", "tree_error", "said"), [
    # the runner hit a full disk and went; writing the rest of the project then failed on a closed pipe
    ("rx runner: no space left to store the project under /c (free some there, or run rx gc on the host)",
     "sending the project failed: I/O operation on closed file",
     "gpu1: no space left to store the project under /c (free some there, or run rx gc on the host)"),
    # the coordinator stopped the upload (a file changed): its own words, not the runner's echo of them
    (f"rx runner: {wire.COORDINATOR_SEND_FAILED}: data/a.csv changed while it was sent",
     "data/a.csv changed while it was sent", "gpu1: data/a.csv changed while it was sent"),
    ("rx runner: no space left to store the project under /c (free some there, or run rx gc on the host)",
     None, "gpu1: no space left to store the project under /c (free some there, or run rx gc on the host)"),
])
def test_the_host_s_reason_for_a_project_it_could_not_store_comes_first(tail: str, tree_error: str | None,
                                                                      said: str) -> None:
    error = _no_result_error(_call(70, tail, tree_error), None)
    assert isinstance(error, SyncError) and str(error).startswith(said), str(error)
