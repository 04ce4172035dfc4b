"""The Slurm launcher without a cluster: settings and the options rx owns, the sbatch command line (each
option a word of its own, never read by a shell), the job's script, sbatch's answers, one poll for many
jobs, and the ``slurm`` table of a remote."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from remote_exec.backends.base import CommandResult
from remote_exec.backends.local import MockBackend
from remote_exec.config import Configuration, Remote
from remote_exec.errors import ConfigError, RunnerError
from remote_exec.launchers.jobs import ENDED, GONE, PENDING, Job, JobRequest
from remote_exec.launchers.slurm import GONE_AFTER, SlurmLauncher, slurm_settings

RUN_DIR = "/home/rx/.cache/remote_exec/runs/r1-abcd"
ARGV = ("python3", "-c", "import sys\nprint('it''s')", "sha", "~/.cache/remote_exec", "batch", RUN_DIR)


def request(**changes: object) -> JobRequest:
    fields: dict[str, object] = {"argv": ARGV, "run_dir": RUN_DIR, "name": "train.py"}
    fields.update(changes)
    return JobRequest(**fields)  # type: ignore[arg-type]


def test_the_table_and_the_words_become_sbatch_options_in_order() -> None:
    settings = slurm_settings({"partition": "gpu", "time": 60, "gres": "gpu:1", "mem": "16G", "account": "lab",
                               "cpus_per_task": 4, "extra": ["--constraint=a100"],
                               "args": ["--qos=high", "--job-name", "my job"]})

    assert settings.words == ["--partition=gpu", "--time=60", "--gres=gpu:1", "--mem=16G", "--account=lab",
                              "--cpus-per-task=4", "--constraint=a100", "--qos=high", "--job-name", "my job"]
    assert settings.requeue is False and settings.signal == "B:USR2@60"


@pytest.mark.parametrize("word", ["--output=log", "-o", "-olog", "--error=x", "--wrap=hostname", "--array=0-9",
                                  "-a", "--chdir=/tmp", "-D", "--parsable", "--wait", "--open-mode=truncate",
                                  "--comment=two\nlines"])
def test_options_rx_owns_are_refused_with_the_reason(word: str) -> None:
    with pytest.raises(ConfigError, match="is rx's to set") as caught:
        slurm_settings({"args": [word]})
    assert caught.value.hint == "leave it out"


def test_the_users_requeue_and_signal_win() -> None:
    settings = slurm_settings({"requeue": False, "args": ["--requeue", "--signal=B:USR1@300"]})

    assert settings.requeue is True and settings.signal is None


@pytest.mark.parametrize(("options", "message"), [
    ({"partiton": "gpu"}, "unknown setting 'partiton'"),
    ({"time": True}, "time = True is not"),
    ({"requeue": "yes"}, "requeue = 'yes' is not a bool"),
    ({"extra": ["--mem=1G", 3]}, "extra must be a list of strings"),
    ({"poll_interval": 60, "poll_max": 30}, "poll_interval 60 must be at least 0.05 and at most poll_max 30"),
])
def test_bad_settings_are_one_clear_error(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match="slurm: " + message.replace("(", r"\(")):
        slurm_settings(options)


def test_the_sbatch_command_line_has_rxs_options_then_the_users() -> None:
    launcher = SlurmLauncher({"partition": "gpu", "extra": ["--gres=gpu:1"]})

    argv = launcher.sbatch_argv(request(), launcher.settings)

    assert argv == ["sbatch", "--parsable", "--job-name=rx:train.py", f"--chdir={RUN_DIR}", "--open-mode=append",
                    "--no-requeue", f"--output={RUN_DIR}/.rx/slurm-%j.out", "--signal=B:USR2@60", "--partition=gpu",
                    "--gres=gpu:1"]


def test_an_array_is_one_submission_with_a_log_per_element() -> None:
    launcher = SlurmLauncher()

    argv = launcher.sbatch_argv(request(run_dir=RUN_DIR + "-0", array=100, parallel=8), launcher.settings)

    assert "--array=0-99%8" in argv and f"--output={RUN_DIR}-%a/.rx/slurm-%A_%a.out" in argv


def submitted(answer: CommandResult) -> tuple[list[str], bytes, MockBackend]:
    seen: list[tuple[list[str], bytes]] = []

    def handler(argv: Sequence[str], stdin: bytes) -> CommandResult:
        seen.append((list(argv), stdin))
        return answer

    backend = MockBackend(handler)
    SlurmLauncher({"args": ["--comment=it's \"quoted\"; $(rm -rf ~)"]}).submit(backend, request())
    return seen[0][0], seen[0][1], backend


def test_sbatch_gets_every_option_as_a_word_and_the_script_runs_the_runner_exactly() -> None:
    argv, script, _ = submitted(CommandResult(argv=(), exit_code=0, stdout=b"1796539650\n42\n"))

    assert argv[:3] == ["sh", "-c", argv[2]] and argv[4] == f"{RUN_DIR}/.rx/job.sh"
    assert argv[-1] == "--comment=it's \"quoted\"; $(rm -rf ~)"  # one word: sbatch's argv, no shell in between
    text = script.decode()
    assert tuple(shlex.split(text[text.index("\nexec ") + len("\nexec "):])) == ARGV
    done = subprocess.run(["sh", "-n"], input=script, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    assert b"export RX_JOB_REQUEUE=0\n" in script


def test_sbatchs_answer_is_the_job_and_its_refusal_one_line() -> None:
    launcher = SlurmLauncher()
    backend = MockBackend(lambda argv, stdin: CommandResult(argv=(), exit_code=0, stdout=b"1796539650\n42;rxcluster\n"))
    job = launcher.submit(backend, request())
    assert (job.job_id, job.submitted, job.workdir, job.log) == ("42", 1796539650.0, RUN_DIR, "slurm-42.out")

    refusing = MockBackend(lambda argv, stdin: CommandResult(
        argv=(), exit_code=1, stdout=b"1796539650\n",
        stderr=b"sbatch: error: invalid partition specified: gpux\n"
               b"sbatch: error: Batch job submission failed: Invalid partition name specified\n"))
    with pytest.raises(RunnerError, match="sbatch on mock refused the job: sbatch: error: Batch job submission "
                                          "failed: Invalid partition name specified"):
        launcher.submit(refusing, request())


POLL_ANSWER = f"""\
42|42|RUNNING|None|debug|c1|1796539651|0:05|100|{RUN_DIR}
43|43|PENDING|Resources|debug||1796539652|0:00|100|/other/run
@@rx squeue 0
41|debug|200
43|debug|100
@@rx queue
1000
acct 0
"""


def test_one_poll_asks_squeue_about_every_job_at_once_and_probes_accounting_once() -> None:
    calls: list[list[str]] = []

    def handler(argv: Sequence[str], stdin: bytes) -> CommandResult:
        calls.append(list(argv))
        return CommandResult(argv=(), exit_code=0, stdout=POLL_ANSWER.encode())

    jobs = [Job("slurm", "42", 1796539650.0, RUN_DIR), Job("slurm", "44", 1796539650.0, RUN_DIR + "x")]
    memo: dict[str, object] = {}
    states = SlurmLauncher().poll(MockBackend(handler), jobs, {}, memo)

    # one squeue for both; accounting asked only of the job squeue no longer shows
    assert [call[4] for call in calls] == ["42,44", "44"] and calls[0][-1] == "probe" and "sacct" in calls[1][2]
    assert memo == {"uid": "1000", "accounting": True}
    assert states[("42", None)].state == "RUNNING" and states[("42", None)].nodes == "c1"
    # 44 is in neither squeue nor (this time) accounting: not gone yet, only missing
    assert states[("44", None)].phase == PENDING and "missing_since" in states[("44", None)].info


def test_a_job_unknown_to_squeue_and_accounting_for_long_enough_is_gone() -> None:
    def handler(argv: Sequence[str], stdin: bytes) -> CommandResult:
        if "sacct" in argv[2] and "squeue" not in argv[2]:
            return CommandResult(argv=(), exit_code=0, stdout=b"")
        return CommandResult(argv=(), exit_code=1,
                             stdout=b"slurm_load_jobs error: Invalid job id specified\n@@rx squeue 1\n@@rx queue\n")

    job = Job("slurm", "44", 1796539650.0, RUN_DIR)
    launcher = SlurmLauncher()
    first = launcher.poll(MockBackend(handler), [job], {}, {"accounting": True})[("44", None)]
    aged = type(first)(index=None, state="", phase=PENDING,
                       info={**first.info, "missing_since": first.info["missing_since"] - GONE_AFTER})
    later = launcher.poll(MockBackend(handler), [job], {("44", None): aged}, {"accounting": True})[("44", None)]

    assert first.phase != GONE and later.phase == GONE


def test_a_scheduler_that_does_not_answer_is_an_error_not_a_vanished_job() -> None:
    answer = b"slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n@@rx squeue 1\n@@rx queue\n"
    backend = MockBackend(lambda argv, stdin: CommandResult(argv=(), exit_code=0, stdout=answer))

    with pytest.raises(RunnerError, match=r"squeue on mock failed: .*Unable to contact slurm controller"):
        SlurmLauncher().poll(backend, [Job("slurm", "42", 0.0, RUN_DIR)], {}, {"accounting": True})


@pytest.mark.parametrize("accounting_answers", [True, False])
def test_an_ended_job_that_may_be_requeued_says_so(accounting_answers: bool) -> None:
    answer = f"42|42|NODE_FAIL|None|debug|c1|1796539651|0:05|100|{RUN_DIR}\n@@rx squeue 0\n@@rx queue\n".encode()

    def handler(argv: Sequence[str], stdin: bytes) -> CommandResult:
        if "squeue" in argv[2]:
            return CommandResult(argv=(), exit_code=0, stdout=answer)
        return CommandResult(argv=(), exit_code=0 if accounting_answers else 1, stdout=b"")

    job = Job("slurm", "42", 1796539650.0, RUN_DIR, requeue=True)
    state = SlurmLauncher().poll(MockBackend(handler), [job], {}, {"accounting": True})[("42", None)]

    assert state.phase == ENDED and state.info["may_requeue"] is True


def test_a_remotes_slurm_table_selects_the_launcher_and_is_checked_when_loaded(tmp_path: Path) -> None:
    remote = Remote.from_table("cluster", {"host": "login1", "slurm": {"partition": "gpu", "time": "1:00:00"}})
    assert remote.scheduler == "slurm" and remote.launcher_options == {"partition": "gpu", "time": "1:00:00"}

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[tool.rx.remotes.cluster]\nhost = "login1"\nslurm = { extra = ["--output=x"] }\n')
    with pytest.raises(ConfigError, match=r"\[tool.rx.remotes.cluster\]: slurm: '--output=x' is rx's to set"):
        Configuration.from_pyproject(pyproject)
    pyproject.write_text('[tool.rx.remotes.cluster]\nhost = "login1"\nslurm = "gpu"\n')
    with pytest.raises(ConfigError, match="slurm must be a table"):
        Configuration.from_pyproject(pyproject)
