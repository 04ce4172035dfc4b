"""The project tree on the coordinator's side: the root, what travels (git's view, or a walk that agrees with
it), .rxignore, include patterns, symlinks, odd names, modes, the stat cache and the guardrails."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from remote_exec.errors import SyncError
from remote_exec.protocol import wire
from remote_exec.sync import statcache
from remote_exec.sync.listing import list_files, literal_prefix
from remote_exec.sync.project import Project, ProjectSpec
from remote_exec.sync.root import find_project_root
from remote_exec.sync.tree import MAX_TREE_BYTES, Tree, TreeFile, guard

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

Write = Callable[..., Path]


@pytest.fixture
def write(tmp_path: Path) -> Write:
    """``write("a/b.txt", "text")``: a file under ``tmp_path/proj`` (parents made)."""

    def make(relative: str, text: str = "x", mode: int | None = None) -> Path:
        path = tmp_path / "proj" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        if mode is not None:
            path.chmod(mode)
        return path

    return make


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def paths(root: Path, **options: object) -> list[str]:
    return list(list_files(root, **options).paths)  # type: ignore[arg-type]


# -- the root ----------------------------------------------------------------------------------------


def test_the_root_is_the_first_marker_up_and_never_home(tmp_path: Path, write: Write) -> None:
    home = tmp_path / "home"
    (home / ".git").mkdir(parents=True)  # a dotfiles repository in ~
    script = home / "work" / "proj" / "src" / "train.py"
    script.parent.mkdir(parents=True)
    script.write_text("")
    assert find_project_root(script, home=home) is None  # not the home directory
    (home / "work" / "proj" / "pyproject.toml").write_text("")
    assert find_project_root(script, home=home) == home / "work" / "proj"
    (home / "work" / "proj" / "src" / "setup.cfg").write_text("")
    assert find_project_root(script, home=home) == home / "work" / "proj" / "src"  # the nearest wins
    assert find_project_root(home / "work" / "proj" / "src", home=home) == home / "work" / "proj" / "src"


def test_a_git_file_marks_a_worktree_root(tmp_path: Path) -> None:
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / ".git").write_text("gitdir: /elsewhere\n")
    assert find_project_root(tmp_path / "wt", home=tmp_path / "home") == tmp_path / "wt"


# -- what travels ----------------------------------------------------------------------------------


TRICKY = {
    ".gitignore": "*.log\n!keep.log\nbuild/\n/top.txt\ndata/\n!data/small.csv\ndocs/*.md\n!docs/keep.md\n",
    "a.py": "", "debug.log": "", "keep.log": "", "top.txt": "", "sub/top.txt": "",
    "build/out.o": "", "src/build/x.o": "", "data/small.csv": "", "data/big.bin": "",
    "docs/a.md": "", "docs/keep.md": "", "docs/sub/b.md": "",
    "sub/.gitignore": "*.tmp\n!important.tmp\n/local/\n", "sub/x.tmp": "", "sub/important.tmp": "",
    "sub/local/y": "", "sub/deeper/local/z": "",
    ".venv/lib/site.py": "", "env2/pyvenv.cfg": "", "env2/lib/x.py": "", "pkg/__pycache__/m.pyc": "",
    "pkg/m.py": "", "pkg/m.pyc": "", ".mypy_cache/x": "", "node_modules/a/index.js": "",
    ".ipynb_checkpoints/n.ipynb": "", ".rx/runs/1/state.json": "", "sub/.rx/runs/2/state.json": "",
    "nb/.ipynb_checkpoints/c.ipynb": "",
}
TRAVELS = [".gitignore", "a.py", "docs/keep.md", "docs/sub/b.md", "keep.log", "pkg/m.py", "sub/.gitignore",
           "sub/deeper/local/z", "sub/important.tmp", "sub/top.txt"]


def _tricky(write: Write) -> Path:
    for relative, text in TRICKY.items():
        root = write(relative, text).parents[len(Path(relative).parts) - 1]
    return root


def test_a_walk_applies_nested_and_negated_ignores_as_git_does(write: Write) -> None:
    root = _tricky(write)
    # data/ is excluded as a directory: its negated file cannot come back (git's rule); build/ matches a
    # directory of that name at any depth; /top.txt and /local/ only next to their .gitignore.
    assert paths(root, use_git=False) == TRAVELS


@needs_git
def test_git_lists_the_same_as_the_walk(write: Write) -> None:
    root = _tricky(write)
    git(root, "init", "-q")
    git(root, "add", "a.py")
    listing = list_files(root)
    assert listing.how == "git"
    assert list(listing.paths) == TRAVELS == paths(root, use_git=False)


@needs_git
def test_tracked_files_travel_even_if_ignored_later_but_never_the_left_out_set(write: Write) -> None:
    root = write("ignored.txt").parent
    write("tracked/.venv/pyvenv.cfg")
    write("tracked/.venv/lib.py")
    git(root, "init", "-q")
    git(root, "add", "-f", "ignored.txt", "tracked")
    write(".gitignore", "ignored.txt\ntracked/\n")
    assert paths(root) == [".gitignore", "ignored.txt"]  # what git tracks; never a virtualenv


@pytest.mark.parametrize("use_git", [True, False])
def test_rxignore_takes_paths_out_nested_like_gitignore(write: Write, use_git: bool) -> None:
    if use_git and shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = write("keep.py").parent
    write(".rxignore", "*.ckpt\nscratch/\n")
    write("model.ckpt")
    write("scratch/notes.txt")
    write("exp/.rxignore", "!*.ckpt\nraw/\n")  # a deeper file overrides a shallower one
    write("exp/best.ckpt")
    write("exp/raw/a.bin")
    write("exp/cooked/b.bin")
    if use_git:
        git(root, "init", "-q")
    assert paths(root, use_git=use_git) == [".rxignore", "exp/.rxignore", "exp/best.ckpt", "exp/cooked/b.bin",
                                            "keep.py"]


@pytest.mark.parametrize("use_git", [True, False])
def test_include_puts_an_ignored_directory_back_but_never_the_left_out_set(write: Write, use_git: bool) -> None:
    if use_git and shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = write(".gitignore", "data/\n*.csv\n").parent
    write("train.py")
    write("data/x.csv")
    write("data/raw/y.npy")
    write("data/__pycache__/z.pyc")
    write("data/.venv/pyvenv.cfg")
    write("other/skip.csv")
    if use_git:
        git(root, "init", "-q")
    assert paths(root, use_git=use_git) == [".gitignore", "train.py"]
    assert paths(root, use_git=use_git, include=["data/"]) == [".gitignore", "data/raw/y.npy", "data/x.csv",
                                                               "train.py"]
    assert paths(root, use_git=use_git, include=["/data/*.csv", "other/"]) == [".gitignore", "data/x.csv",
                                                                             "other/skip.csv", "train.py"]
    assert paths(root, use_git=use_git, include=["data/", "!data/raw/"]) == [".gitignore", "data/x.csv",
                                                                           "train.py"]


def test_the_workspace_and_rx_cache_never_travel(write: Write) -> None:
    root = write("a.py").parent
    write("runs_here/runs/1/state.json")
    write("cache/archives/x.pyz")
    assert paths(root, use_git=False, outside=["runs_here", "cache"]) == ["a.py"]


@pytest.mark.parametrize(("pattern", "prefix"), [("data/", ""), ("/data/", "data"), ("data/raw/*.npy", "data/raw"),
                                                 ("a/**/b", "a"), ("*.csv", ""), ("/x/y[0-9]/z", "x")])
def test_an_include_pattern_walks_only_below_its_literal_prefix(pattern: str, prefix: str) -> None:
    assert literal_prefix(pattern) == prefix


# -- the tree --------------------------------------------------------------------------------------


def scan(root: Path, cache: Path | None = None, **spec: object) -> Tree:
    return Project(ProjectSpec(root=root.resolve(), **spec), cache).scan()  # type: ignore[arg-type]


def test_odd_names_modes_and_links_inside_the_tree(write: Write) -> None:
    root = write("plain.txt", "p").parent
    write("with space/ü ni€.txt", "u")
    write("new\nline.txt", "n")
    write("run.sh", "#!/bin/sh\n", mode=0o755)
    write("private.cfg", "s", mode=0o600)
    os.symlink("plain.txt", root / "link.txt")
    os.symlink(str(root / "with space"), root / "abs-dir")  # absolute, but inside: made relative
    tree = scan(root)
    by_path = {entry.path: entry for entry in tree.entries}
    assert sorted(by_path) == ["abs-dir", "link.txt", "new\nline.txt", "plain.txt", "private.cfg", "run.sh",
                               "with space/ü ni€.txt"]
    assert by_path["run.sh"].mode == 0o100755
    assert by_path["private.cfg"].mode == by_path["plain.txt"].mode == 0o100644
    assert (by_path["link.txt"].mode, by_path["link.txt"].link) == (wire.LINK_MODE, "plain.txt")
    assert by_path["abs-dir"].link == "with space"
    assert wire.load_manifest(tree.manifest) == tree.wire_entries
    assert wire.tree_id(tree.wire_entries) == tree.tree_id


def test_a_symlink_leading_out_is_refused_or_followed(tmp_path: Path, write: Write) -> None:
    root = write("train.py").parent
    outside = tmp_path / "datasets"
    (outside / "imagenet").mkdir(parents=True)
    (outside / "imagenet" / "a.jpg").write_text("jpg")
    (outside / "labels.txt").write_text("cat")
    os.symlink(outside / "imagenet", root / "images")
    os.symlink("../datasets/labels.txt", root / "labels.txt")
    with pytest.raises(SyncError) as refused:
        scan(root)
    assert "lead out of the project" in str(refused.value)
    assert f"images -> {outside / 'imagenet'}" in str(refused.value) and "--follow-symlinks" in str(refused.value)
    tree = scan(root, follow_symlinks=True)
    entries = {entry.path: entry for entry in tree.entries}
    assert sorted(entries) == ["images/a.jpg", "labels.txt", "train.py"]
    assert not entries["labels.txt"].link and entries["labels.txt"].size == 3


def test_the_tree_id_changes_with_content_mode_and_path_only(write: Write) -> None:
    root = write("a.txt", "one").parent
    first = scan(root).tree_id
    assert scan(root).tree_id == first
    (root / "a.txt").write_text("two")
    second = scan(root).tree_id
    (root / "a.txt").chmod(0o755)
    third = scan(root).tree_id
    (root / "a.txt").rename(root / "b.txt")
    fourth = scan(root).tree_id
    assert len({first, second, third, fourth}) == 4
    (root / "b.txt").chmod(0o644)
    (root / "b.txt").rename(root / "a.txt")
    assert scan(root).tree_id == second  # the same content, mode and path: the same tree


# -- the stat cache --------------------------------------------------------------------------------


def test_an_unchanged_tree_is_not_read_again(write: Write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write("a.txt", "a").parent
    write("b.txt", "b")
    monkeypatch.setattr(statcache, "RACY_SECONDS", 0.0)  # the files are not written again within it
    time.sleep(0.02)
    scan(root, tmp_path / "cache")
    hashed: list[str] = []
    original = statcache.hash_file

    def counting(path: str) -> tuple[bytes, os.stat_result, int]:
        hashed.append(os.path.basename(path))
        return original(path)

    monkeypatch.setattr(statcache, "hash_file", counting)
    scan(root, tmp_path / "cache")  # a new Project: the cache comes from disk
    assert hashed == []
    (root / "b.txt").write_text("B")  # same size, new content
    tree = scan(root, tmp_path / "cache")
    assert hashed == ["b.txt"]
    assert {entry.path: entry.digest for entry in tree.entries}["b.txt"] == statcache.hash_file(root / "b.txt")[0]


def test_a_file_changed_within_the_racy_window_is_read_again(write: Write, tmp_path: Path) -> None:
    root = write("a.txt", "a").parent
    project = Project(ProjectSpec(root=root.resolve()), tmp_path / "cache")
    first = project.scan()
    # Same size, and its stat data made to look unchanged but for ctime (which no one can set back):
    # the entry was hashed within the racy window, so it is hashed again whatever the stat data says.
    st = os.stat(root / "a.txt")
    (root / "a.txt").write_text("b")
    os.utime(root / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert project.scan().tree_id != first.tree_id


def test_a_file_that_cannot_be_read_is_one_clear_error(write: Write, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write("secret.txt").parent
    (root / "secret.txt").chmod(0)
    if os.geteuid() == 0:  # root reads everything: the file system's refusal, as another user would get it

        def refused(path: str) -> tuple[bytes, os.stat_result, int]:
            raise PermissionError(13, "Permission denied", path)

        monkeypatch.setattr(statcache, "hash_file", refused)
    with pytest.raises(SyncError, match=r"cannot read secret\.txt of the project .*: Permission denied"):
        scan(root)


# -- guardrails ------------------------------------------------------------------------------------


def _tree(sizes: dict[str, int]) -> Tree:
    return Tree(Path("/p"), tuple(TreeFile(path, 0o100644, size, bytes(32)) for path, size in sorted(sizes.items())))


def test_guardrails_warn_name_the_largest_and_refuse_above_the_limit() -> None:
    assert guard(_tree({"a": 10})) == []
    [warning] = guard(_tree({"a": 10, "weights.bin": 50 << 20}))
    assert "weights.bin (50.0 MiB)" in warning and ".rxignore" in warning
    [warning] = guard(_tree({f"f{i}": 1 for i in range(10_001)}))
    assert "10,001 files" in warning
    huge = _tree({"a.bin": MAX_TREE_BYTES, "b.bin": 1})
    with pytest.raises(SyncError) as refused:
        guard(huge)
    assert "over the 2.0 GiB rx ships" in str(refused.value) and "--force" in str(refused.value)
    assert "a.bin (2.0 GiB)" in str(refused.value)
    assert guard(huge, force=True)  # a warning still
