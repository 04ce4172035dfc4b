"""``rx map`` sweeps: the ``:::`` axes and ``--grid`` files, and the command as a user types it (in a
subprocess, over local "hosts" of the ``double`` backend): one parent run with a line per combination, a
child run each, output lines prefixed with the combination, ``rx rerun PARENT --failed``, ``rx runs`` /
``rx show`` / ``rx export`` showing the sweep as one table, ``rx hosts --status``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from remote_exec.errors import ConfigError
from remote_exec.pool.sweep import grid_of, parse_grid, read_grid_file

REPO = Path(__file__).resolve().parents[2]

TRAIN = """\
import argparse, os, sys, time
p = argparse.ArgumentParser()
p.add_argument("--lr", type=float)
p.add_argument("--seed", type=int)
p.add_argument("--epochs", type=int, default=1)
a = p.parse_args()
print(f"lr={a.lr} seed={a.seed} epochs={a.epochs} gpu={os.environ.get('CUDA_VISIBLE_DEVICES')}")
time.sleep(0.2)
open("out.txt", "w").write(f"{a.lr} {a.seed}\\n")
fail = os.path.exists(os.path.join(os.environ["PROJECT"], "fail-" + str(a.seed)))
sys.exit(3 if fail and a.lr == 0.01 else 0)
"""


def combos(words: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    return [(c.label, c.args) for c in parse_grid(words).combinations()]


def test_axes_follow_gnu_parallels_convention() -> None:
    found = combos(["--epochs", "3", "--lr", ":::", "0.1", "0.01", "--seed", ":::", "1", "2"])
    assert found == [("lr=0.1 seed=1", ("--epochs", "3", "--lr", "0.1", "--seed", "1")),
                     ("lr=0.1 seed=2", ("--epochs", "3", "--lr", "0.1", "--seed", "2")),
                     ("lr=0.01 seed=1", ("--epochs", "3", "--lr", "0.01", "--seed", "1")),
                     ("lr=0.01 seed=2", ("--epochs", "3", "--lr", "0.01", "--seed", "2"))]
    assert combos(["--shift", ":::", "-1", "-0.5", "--", "tail"]) == [
        ("shift=-1", ("--shift", "-1", "tail")), ("shift=-0.5", ("--shift", "-0.5", "tail"))]
    assert [args for _, args in combos([":::", "a", "b", ":::", "x"])] == [("a", "x"), ("b", "x")]
    assert combos(["--plain"]) == [("#0", ("--plain",))]
    with pytest.raises(ConfigError, match="has no values"):
        parse_grid(["--lr", ":::", "--seed", ":::", "1"])
    with pytest.raises(ConfigError, match="two axes are named lr"):
        parse_grid(["--lr", ":::", "1", "--lr", ":::", "2"])


def test_grid_files_give_axes_or_whole_combinations(tmp_path: Path) -> None:
    base = parse_grid(["--epochs", "3"])
    axes = tmp_path / "grid.json"
    axes.write_text(json.dumps({"--lr": [0.1, 0.01], "--amp": [True, False]}))
    assert [c.args for c in read_grid_file(axes, base).combinations()] == [
        ("--epochs", "3", "--lr", "0.1", "--amp"), ("--epochs", "3", "--lr", "0.1"),
        ("--epochs", "3", "--lr", "0.01", "--amp"), ("--epochs", "3", "--lr", "0.01")]
    rows = tmp_path / "grid.csv"
    rows.write_text("--lr,--seed\n0.1,1\n0.3,7\n")
    with_rows = read_grid_file(rows, parse_grid(["--depth", ":::", "2", "4"]))
    assert [c.label for c in with_rows.combinations()] == [
        "depth=2 lr=0.1 seed=1", "depth=2 lr=0.3 seed=7", "depth=4 lr=0.1 seed=1", "depth=4 lr=0.3 seed=7"]
    toml = tmp_path / "grid.toml"
    toml.write_text('"--lr" = [0.5]\n')
    assert [c.args for c in read_grid_file(toml, base).combinations()] == [("--epochs", "3", "--lr", "0.5")]
    assert grid_of(with_rows.record()).combinations() == with_rows.combinations()  # a rerun rebuilds it
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected an object of lists"):
        read_grid_file(bad, base)


# -- the command -------------------------------------------------------------------------------------------

RX = """
import sys
from remote_exec.backends import register
from remote_exec.launchers import register_launcher
register("double", "backend_double:DoubleBackend")
register_launcher("queue", "scheduler_double:QueueLauncher")
from remote_exec.cli import main
main(sys.argv[1:])
"""


@pytest.fixture
def project(isolated: Any) -> Path:
    root: Path = isolated.root / "project"
    root.mkdir()
    remotes = "".join(textwrap.dedent(f"""
        [tool.rx.remotes.{name}]
        backend = "double"
        python = "{sys.executable}"
        workdir = "{isolated.root / name}"
        """) for name in ("box1", "box2"))
    remotes += f'\n[tool.rx.remotes.nopython]\nbackend = "double"\npython = "{isolated.root / "none"}"\n'
    remotes += (f'\n[tool.rx.remotes.cluster]\nbackend = "double"\nscheduler = "queue"\npython = "{sys.executable}"\n'
                f'workdir = "{isolated.root / "shared"}"\n')

    (root / "pyproject.toml").write_text(f"[tool.rx]\n{remotes}")
    (root / "train.py").write_text(TRAIN)
    return root


def rx(isolated: Any, project: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = isolated.env(PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests" / "unit")]), PROJECT=str(project),
                       COLUMNS="200",
                       PATH=f"{REPO / 'testbed' / 'image'}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([sys.executable, "-c", RX, *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def runs(isolated: Any) -> list[dict[str, Any]]:
    from remote_exec.workspace import Workspace

    return [run.info() for run in Workspace(isolated.workspace).runs()]


def test_a_sweep_is_one_parent_run_with_a_child_per_combination(isolated: Any, project: Path) -> None:
    (project / "fail-2").write_text("")
    done = rx(isolated, project, "map", "--no-progress", "-r", "box1", "-r", "box2", "train.py", "--epochs", "2",
              "--lr", ":::", "0.1", "0.01", "--seed", ":::", "1", "2")
    assert done.returncode == 1, done.stderr  # one combination exits 3
    out = done.stdout.splitlines()
    assert sorted(out) == sorted(f"[lr={lr} seed={seed}] lr={lr} seed={seed} epochs=2 gpu=None"
                                 for lr in ("0.1", "0.01") for seed in (1, 2))
    assert "lr=0.01 seed=2: failed on box" in done.stderr
    infos = runs(isolated)
    (parent,) = [info for info in infos if info["kind"] == "sweep"]
    children = [info for info in infos if info["kind"] == "script"]
    assert parent["status"] == "failed" and parent["exit_code"] == 1 and parent["remote"] == "box1,box2"
    assert len(children) == 4 and {child["sweep"]["parent"] for child in children} == {parent["run_id"]}
    board = parent["tasks"]
    assert [entry["name"] for _, entry in sorted(board.items())] == [
        "lr=0.1 seed=1", "lr=0.1 seed=2", "lr=0.01 seed=1", "lr=0.01 seed=2"]
    assert [entry["status"] for _, entry in sorted(board.items())] == ["done", "done", "done", "failed"]
    assert board["0003"]["exit_code"] == 3 and board["0003"]["host"] in ("box1", "box2")
    failed_child = next(child for child in children if child["run_id"] == board["0003"]["run"])
    assert failed_child["exit_code"] == 3 and failed_child["argv"] == ["--epochs", "2", "--lr", "0.01", "--seed", "2"]
    landed = isolated.workspace / "runs" / board["0000"]["run"] / "files" / "out.txt"
    assert landed.read_text() == "0.1 1\n"  # each child run keeps its own files

    listed = rx(isolated, project, "runs")
    assert listed.stdout.count("\n") == 2 and "train.py (sweep)" in listed.stdout  # the sweep is one line
    assert "1/4 failed" in listed.stdout
    assert rx(isolated, project, "runs", "--all").stdout.count("\n") == 6
    shown = rx(isolated, project, "show", "latest")
    assert "combinations" in shown.stdout and "lr=0.01 seed=2" in shown.stdout
    exported = rx(isolated, project, "export", "latest", "--format", "text").stdout
    assert exported.count("    done ") == 3 and "failed    0003 (lr=0.01 seed=2)" in exported

    (project / "fail-2").unlink()
    again = rx(isolated, project, "rerun", "latest", "--failed")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["lr=0.01 seed=2 epochs=2 gpu=None"]  # only the failed one, unprefixed
    rerun = [info for info in runs(isolated) if info["kind"] == "sweep"][-1]
    assert rerun["parent"] == parent["run_id"] and rerun["status"] == "finished"
    merged = [key for key, entry in rerun["tasks"].items() if entry.get("merged_from") == parent["run_id"]]
    assert sorted(merged) == ["0000", "0001", "0002"] and rerun["tasks"]["0003"]["status"] == "done"


def test_a_sweeps_workspace_named_on_the_command_line_stays_out_of_the_snapshot(isolated: Any,
                                                                               project: Path) -> None:
    (project / "look.py").write_text("import os, sys\nprint(sys.argv[1], sorted(os.listdir('.')))\n")
    done = rx(isolated, project, "map", "--no-progress", "-r", "box1", "--workspace", "ws_here", "look.py",
              ":::", "a")
    assert done.returncode == 0, done.stderr
    assert (project / "ws_here" / "runs").is_dir()  # the sweep's records are there
    assert "look.py" in done.stdout and "ws_here" not in done.stdout, done.stdout


def test_dry_run_lists_the_combinations(isolated: Any, project: Path) -> None:
    done = rx(isolated, project, "map", "-r", "box1", "--dry-run", "train.py", "--lr", ":::", "1", "2")
    assert done.returncode == 0
    assert done.stdout.splitlines() == ["0\tlr=1\t--lr 1", "1\tlr=2\t--lr 2"]
    assert runs(isolated) == []
    missing = rx(isolated, project, "map", "train.py", "--lr", ":::", "1")
    assert missing.returncode == 3 and missing.stderr.startswith("rx: error: rx map needs hosts")


def test_hosts_status_shows_gpus_and_this_workspaces_slots(isolated: Any, project: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    (isolated.root / "gpus.json").write_text(json.dumps({"gpus": [{}, {}]}))
    monkeypatch.setenv("RX_FAKE_GPUS", str(isolated.root / "gpus.json"))
    status = rx(isolated, project, "hosts", "--status", "--json", "box1")
    assert status.returncode == 0, status.stderr
    (facts,) = json.loads(status.stdout)
    assert facts["ok"] and [gpu["index"] for gpu in facts["gpus"]] == [0, 1] and facts["locks"] == []
    assert facts["memory"]["available"] > 0
    text = rx(isolated, project, "hosts", "--status", "box1", "nopython")
    assert text.stdout.startswith("box1 (") and "no slots held by rx" in text.stdout
    assert "nopython  unreachable: " in text.stdout and "not found on nopython" in text.stdout


def test_status_names_who_uses_each_gpu() -> None:
    from remote_exec.pool.status import gpu_rows

    facts = {"gpus": [{"index": 0, "uuid": "GPU-a"}, {"index": 1, "uuid": "GPU-b"}, {"index": 2, "uuid": "GPU-c"}],
             "apps": [{"pid": 42, "gpu_uuid": "GPU-b"}],
             "locks": [{"kind": "gpu", "gpu": {"uuid": "GPU-a"}, "mine": True,
                        "owner": {"slot": "gpu1#0", "run_id": "r1", "coordinator": "laptop:7"}}]}
    users = [row["user"] for row in gpu_rows(facts)]
    assert users == [{"kind": "rx", "mine": True, "slot": "gpu1#0", "run_id": "r1", "coordinator": "laptop:7"},
                     {"kind": "foreign", "pids": [42]}, {"kind": "free"}]


def test_a_sweep_on_a_scheduler_remote_runs_each_combination_as_a_job(isolated: Any, project: Path) -> None:
    done = rx(isolated, project, "map", "--no-progress", "-r", "cluster", "train.py", "--lr", ":::", "0.1", "0.5")
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == ["[lr=0.1] lr=0.1 seed=None epochs=1 gpu=None",
                                                "[lr=0.5] lr=0.5 seed=None epochs=1 gpu=None"]
    children = [info for info in runs(isolated) if info["kind"] == "script"]
    assert len(children) == 2 and all(child["status"] == "finished" for child in children)
    assert all(child.get("job") for child in children)  # each child run keeps its job
