"""Projects, not files, against the testbed on both backends: a training project runs in a snapshot of itself,
only what changed travels, its outputs land in the run's files/, and the host's store and GC behave."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from testbed import exec_root

DATA = Path(__file__).resolve().parent / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))
pytest.register_assert_rewrite("remote_support")

from remote_support import HOST, Remote  # noqa: E402

pytest_plugins = ["remote_support"]

TRAIN = """\
import json, os, sys
from pathlib import Path
from mylib.data import load
cfg = json.load(open(sys.argv[1]))
rows = load(cfg["data"])
print("rows", len(rows), "lr", cfg["lr"])
assert (Path(__file__).parent / "configs" / "a.json").is_file()
os.makedirs("outputs", exist_ok=True)
Path("outputs/model.pt").write_bytes(json.dumps({"lr": cfg["lr"], "rows": rows}).encode())
"""

LIST_TREE = """\
import os
found = []
for folder, dirs, files in os.walk("."):
    dirs[:] = [d for d in dirs if d not in (".rx", "__pycache__")]
    found += [os.path.normpath(os.path.join(folder, name)) for name in files]
print("\\n".join(sorted(found)))
"""


def write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def training_project(root: Path) -> None:
    """configs/, data/ (ignored by git: it travels with --include or include), src/mylib, train.py, in git."""
    write(root, {
        ".gitignore": "outputs/\n*.log\n__pycache__/\n",
        "configs/a.json": json.dumps({"lr": 0.1, "data": "data/x.csv"}),
        "data/x.csv": "a,b\n1,2\n3,4\n5,6\n",
        "src/mylib/__init__.py": "",
        "src/mylib/data.py": "def load(path):\n"
                             "    return [line.split(',') for line in open(path).read().split()[1:]]\n",
        "train.py": TRAIN,
        "debug.log": "not shipped\n",
    })
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")


def result_of(remote: Remote) -> dict[str, Any]:
    info = remote.latest()
    record: dict[str, Any] = json.loads(remote.run_dir(info["run_id"]).joinpath("result.json").read_text())
    return {**info, "result": record}


@pytest.mark.parametrize("where", ["remote", "local"])
def test_a_training_project_runs_and_its_model_lands_in_files_outputs(remote: Remote, where: str) -> None:
    training_project(remote.project)
    target = ["--remote", HOST] if where == "remote" else []

    done = remote.rx("run", *target, "train.py", "configs/a.json")

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["rows 3 lr 0.1"]
    files = remote.files_of(remote.latest()["run_id"])
    assert list(files) == ["outputs/model.pt"]  # the outputs only: not the inputs, not caches
    assert json.loads(files["outputs/model.pt"])["rows"] == [["1", "2"], ["3", "4"], ["5", "6"]]
    assert not (remote.project / "outputs").exists()  # never over the user's project


def test_git_decides_what_travels_and_rxignore_takes_more_out(remote: Remote) -> None:
    write(remote.project, {
        ".gitignore": "*.log\n!keep.log\nbuild/\nsecret/\n!secret/ok.txt\n",
        "sub/.gitignore": "*.tmp\n!important.tmp\n",
        ".rxignore": "*.ckpt\nnotes/\n",
        "a.py": "", "debug.log": "", "keep.log": "", "build/out.o": "", "secret/ok.txt": "", "secret/key": "",
        "sub/x.tmp": "", "sub/important.tmp": "", "model.ckpt": "", "notes/n.md": "", "list.py": LIST_TREE,
        ".venv/pyvenv.cfg": "", "pkg/__pycache__/m.pyc": "",
    })
    git(remote.project, "init", "-q")

    done = remote.rx("run", "--remote", HOST, "list.py")

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [".gitignore", ".rxignore", "a.py", "keep.log", "list.py", "pyproject.toml",
                                        "sub/.gitignore", "sub/important.tmp"]


def test_without_git_a_walk_applies_the_gitignore_files_the_same_way(remote: Remote) -> None:
    write(remote.project, {
        ".gitignore": "*.log\n!keep.log\nbuild/\n", "sub/.gitignore": "*.tmp\n!important.tmp\n",
        "a.py": "", "debug.log": "", "keep.log": "", "build/out.o": "", "sub/x.tmp": "", "sub/important.tmp": "",
        "list.py": LIST_TREE,
    })

    done = remote.rx("run", "--remote", HOST, "list.py")

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [".gitignore", "a.py", "keep.log", "list.py", "pyproject.toml",
                                        "sub/.gitignore", "sub/important.tmp"]


def test_include_brings_an_ignored_data_directory(remote: Remote) -> None:
    write(remote.project, {".gitignore": "data/\n", "data/x.csv": "1\n", "data/raw/y.bin": "2",
                           "list.py": LIST_TREE})
    git(remote.project, "init", "-q")

    without = remote.rx("run", "--remote", HOST, "list.py")
    with_data = remote.rx("run", "--remote", HOST, "--include", "data/", "list.py")

    assert without.stdout.splitlines() == [".gitignore", "list.py", "pyproject.toml"]
    assert with_data.stdout.splitlines() == [".gitignore", "data/raw/y.bin", "data/x.csv", "list.py",
                                             "pyproject.toml"]


def test_symlinks_travel_as_links_and_one_leading_out_is_refused_or_followed(remote: Remote, tmp_path: Path) -> None:
    outside = tmp_path / "datasets"
    outside.mkdir()
    (outside / "big.txt").write_text("outside data")
    write(remote.project, {"real/config.txt": "inside", "check.py": (
        "import os\nprint(os.path.islink('alias'), os.readlink('alias'), open('alias/config.txt').read())\n"
        "print(os.path.islink('ext'), open('ext/big.txt').read() if os.path.exists('ext') else None)\n")})
    os.symlink("real", remote.project / "alias")
    os.symlink(outside, remote.project / "ext")

    refused = remote.rx("run", "--remote", HOST, "check.py")
    followed = remote.rx("run", "--remote", HOST, "--follow-symlinks", "check.py")

    assert refused.returncode == 3
    errors = [line for line in refused.stderr.splitlines() if line.startswith("rx: error:")]
    assert len(errors) == 1 and f"ext -> {outside}" in errors[0] and "--follow-symlinks" in errors[0], refused.stderr
    assert "Traceback" not in refused.stderr
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.splitlines() == ["True real inside", "False outside data"]


def test_exec_bits_and_odd_names_survive_both_ways(remote: Remote) -> None:
    odd = "with space/ü ni€\nline.txt"
    write(remote.project, {odd: "odd", "tool.sh": "#!/bin/sh\necho tool ran\n", "run.py": (
        "import subprocess, os\n"
        "print(subprocess.run(['./tool.sh'], capture_output=True, text=True).stdout.strip())\n"
        f"print(open({odd!r}).read())\n"
        "open('out ü\\nput.txt', 'w').write('back')\n")})
    (remote.project / "tool.sh").chmod(0o755)

    done = remote.rx("run", "--remote", HOST, "run.py")

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["tool ran", "odd"]
    assert remote.files_of(remote.latest()["run_id"]) == {"out ü\nput.txt": b"back"}


def test_a_second_run_sends_nothing_an_edit_one_file_and_a_deleted_file_is_gone(remote: Remote,
                                                                                 fresh_workdir: str) -> None:
    write(remote.project, {
        "pyproject.toml": f'[tool.rx.remotes.{HOST}]\nworkdir = "{fresh_workdir}"\n',
        "data/a.csv": "a" * 5000, "data/b.csv": "b" * 5000, "list.py": LIST_TREE,
    })

    synced = []
    outputs = []
    for change in (None, None, lambda: (remote.project / "data" / "a.csv").write_text("A" * 5000),
                   lambda: (remote.project / "data" / "b.csv").unlink()):
        if change is not None:
            change()
        done = remote.rx("run", "--remote", HOST, "list.py")
        assert done.returncode == 0, done.stderr
        synced.append(result_of(remote)["result"]["synced"])
        outputs.append(done.stdout.splitlines())

    first, unchanged, edited, deleted = synced
    assert first == {"files": 4, "bytes": sum(len(p.read_bytes()) for p in remote.project.rglob("*")
                                              if p.is_file()) + 5000}
    assert unchanged is None  # the host had the tree: nothing travelled, not even the manifest
    assert edited == {"files": 1, "bytes": 5000}
    assert deleted is None or deleted == {"files": 0, "bytes": 0}  # only the manifest
    assert "data/b.csv" in outputs[2] and "data/b.csv" not in outputs[3]


def test_two_runs_of_different_trees_at_once(remote: Remote, tmp_path: Path) -> None:
    projects = []
    for name in ("one", "two"):
        root = tmp_path / name
        write(root, {"setup.py": "", "which.txt": name * 100000,
                     "show.py": "import time\ntime.sleep(1)\nprint(open('which.txt').read()[:3])\n"})
        projects.append(root)
    processes = [subprocess.Popen(remote.argv("run", "--remote", HOST, "show.py"), cwd=root, env=remote.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for root in projects]
    outputs = [process.communicate(timeout=90) for process in processes]

    assert [process.returncode for process in processes] == [0, 0], [err for _, err in outputs]
    assert [out.decode().strip() for out, _ in outputs] == ["one", "two"]


def test_a_failed_and_a_timed_out_run_bring_back_what_they_wrote(remote: Remote) -> None:
    write(remote.project, {
        "crash.py": "open('ckpt/step1.pt', 'w').write('1') if __import__('os').makedirs('ckpt') is None else 0\n"
                    "raise RuntimeError('diverged')\n",
        "slow.py": "import time, os\nos.makedirs('ckpt', exist_ok=True)\nopen('ckpt/step2.pt', 'w').write('2')\n"
                   "print('saved', flush=True)\ntime.sleep(60)\n",
    })

    crashed = remote.rx("run", "--remote", HOST, "crash.py")
    crashed_files = remote.files_of(remote.latest()["run_id"])
    timed_out = remote.rx("run", "--remote", HOST, "--timeout", "3", "slow.py")
    timed_out_files = remote.files_of(remote.latest()["run_id"])

    assert crashed.returncode == 1 and "RuntimeError: diverged" in crashed.stderr
    assert crashed_files == {"ckpt/step1.pt": b"1"}
    assert timed_out.returncode == 124, timed_out.stderr
    assert timed_out_files == {"ckpt/step2.pt": b"2"}


def test_ctrl_c_brings_back_what_the_run_saved_in_its_snapshot(remote: Remote) -> None:
    write(remote.project, {
        "checkpoint.py": "import os, time\nos.makedirs('ckpt', exist_ok=True)\n"
                         "try:\n    print('started', flush=True)\n    time.sleep(120)\n"
                         "except KeyboardInterrupt:\n    open('ckpt/last.pt', 'w').write('saved on Ctrl-C')\n"
                         "    raise\n",
    })
    with subprocess.Popen(remote.argv("run", "--remote", HOST, "checkpoint.py"), cwd=remote.project,
                          env=remote.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == b"started\n"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert remote.files_of(remote.latest()["run_id"]) == {"ckpt/last.pt": b"saved on Ctrl-C"}


def test_outputs_made_unreadable_are_named_as_skipped_and_the_rest_comes_back(remote: Remote) -> None:
    write(remote.project, {
        "lock.py": "import os, sys\nopen('fine.txt', 'w').write('fine')\nopen('secret.txt', 'w').write('no')\n"
                   "os.chmod('secret.txt', 0)\nos.makedirs('closed/inner')\n"
                   "open('closed/inner/x.txt', 'w').write('x')\nos.chmod('closed', 0)\nsys.exit(3)\n",
    })

    done = remote.rx("run", "--remote", HOST, "lock.py")

    assert done.returncode == 3, done.stderr
    assert "could not be read" in done.stderr
    assert remote.files_of(remote.latest()["run_id"]) == {"fine.txt": b"fine"}
    assert sorted(entry["path"] for entry in result_of(remote)["result"]["skipped"]) == ["closed/", "secret.txt"]
    again = remote.rx("run", "--remote", HOST, "lock.py")  # the next run's snapshot holds none of it
    assert again.returncode == 3 and remote.files_of(remote.latest()["run_id"]) == {"fine.txt": b"fine"}


def test_a_task_reads_files_of_its_project_relative_to_where_it_was_called(remote: Remote,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    write(remote.project, {"data/x.csv": "1,2\n", "tasks_mod.py": (
        "from pathlib import Path\nfrom remote_exec import task\n\n"
        f"@task(remote={HOST!r})\n"
        "def read(name):\n"
        "    import os\n"
        "    return open(name).read(), (Path(__file__).parent / 'data' / 'x.csv').read_text(), os.getcwd()\n")})
    monkeypatch.syspath_prepend(str(remote.project))
    import tasks_mod

    relative, by_file, cwd = tasks_mod.read("data/x.csv")

    assert relative == by_file == "1,2\n"
    assert cwd.startswith("/home/rx/.cache/remote_exec/runs/")
    sys.modules.pop("tasks_mod", None)


def test_rx_sync_lists_what_travels_and_stores_it_ahead_of_a_run(remote: Remote, fresh_workdir: str) -> None:
    write(remote.project, {"pyproject.toml": f'[tool.rx.remotes.{HOST}]\nworkdir = "{fresh_workdir}"\n',
                           "weights.bin": "w" * 20000, "hello.py": "print('hi')\n"})

    listed = remote.rx("sync", "--dry-run")
    stored = remote.rx("sync", "--remote", HOST, "--json")
    run = remote.rx("run", "--remote", HOST, "hello.py")

    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == ["hello.py", "pyproject.toml", "weights.bin"]
    assert "3 files, 19.6 KiB" in listed.stderr and "weights.bin" in listed.stderr.split("largest")[1]
    assert stored.returncode == 0, stored.stderr
    assert json.loads(stored.stdout)["blobs"] == 3
    assert run.returncode == 0 and result_of(remote)["result"]["synced"] is None


def test_gc_never_removes_what_a_running_run_uses(remote: Remote, fresh_workdir: str) -> None:
    write(remote.project, {
        "pyproject.toml": f'[tool.rx]\ncache_limit = "1KiB"\n[tool.rx.remotes.{HOST}]\nworkdir = "{fresh_workdir}"\n',
        "long.py": "import time, json\ntime.sleep(6)\nprint(json.load(open('cfg.json'))['x'])\n"
                   "open('out.txt', 'w').write('done')\n",
        "cfg.json": '{"x": 7}',
    })
    started = remote.rx("run", "--remote", HOST, "--detach", "long.py")
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    time.sleep(1.5)

    collected = remote.rx("gc", HOST, "--json")
    attached = remote.rx("attach", run_id)

    assert collected.returncode == 0, collected.stderr
    report = json.loads(collected.stdout)[-1]
    removed = {entry["kind"] for entry in report["removed"]}
    assert "run" not in removed and "archive" not in removed, report  # the running run's own
    assert attached.returncode == 0, attached.stderr
    assert attached.stdout.strip() == "7"
    assert remote.files_of(run_id) == {"out.txt": b"done"}


def test_without_a_project_root_the_script_and_its_imports_travel_as_before(remote: Remote) -> None:
    (remote.project / "pyproject.toml").unlink()
    write(remote.project, {"helper_mod.py": "VALUE = 41\n",
                           "main.py": "import helper_mod\nprint(helper_mod.VALUE + 1)\n"
                                      "open('o.txt', 'w').write('x')\n"})

    done = remote.rx("run", "--remote", HOST, "main.py")

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["42"]
    assert done.stderr.splitlines()[0].startswith("rx: no project root above main.py")
    assert remote.files_of(remote.latest()["run_id"]) == {"o.txt": b"x"}


def test_the_remote_store_holds_checked_blobs_and_read_only_files(remote: Remote, fresh_workdir: str) -> None:
    write(remote.project, {"pyproject.toml": f'[tool.rx.remotes.{HOST}]\nworkdir = "{fresh_workdir}"\n',
                           "a.txt": "alpha", "hello.py": "print('hi')\n"})
    assert remote.rx("run", "--remote", HOST, "hello.py").returncode == 0
    store = fresh_workdir.replace("~", "/home/rx")
    code, listing = exec_root(remote.host, f"cd {store} && find blobs trees -type f -printf '%m %p\\n'")
    assert code == 0, listing
    modes = dict(line.split(" ", 1)[::-1] for line in listing.splitlines())
    blobs = [path for path in modes if path.startswith("blobs/")]
    assert {modes[path] for path in blobs} == {"444"}
    assert {path.rsplit("/", 1)[1] for path in blobs} == {
        hashlib.sha256(p.read_bytes()).hexdigest() for p in remote.project.iterdir() if p.is_file()}
    assert not str(store).startswith("/tmp")
