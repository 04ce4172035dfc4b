"""The benchmark report on fixed inputs: statistics, the table, the targets, the phase table.

No timing is asserted here (the benchmarks are not tests); these check the arithmetic and the wording
that RESULTS.md is built from.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from benchmarks.report import PhaseRecord, Results, Row, Target, evaluate, render_phases, render_tables
from benchmarks.stats import MB, Summary, format_rate, format_seconds, percentile
from benchmarks.suite import ROWS, TARGETS, _parse_importtime


def test_percentile_interpolates_like_numpy_linear() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 6.0, 7.0, 9.0, 8.0]
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 90) == pytest.approx(9.1)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 10.0
    assert percentile([0.2], 90) == 0.2


def test_percentile_refuses_nothing_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_of_samples() -> None:
    summary = Summary.of([0.3, 0.1, 0.2])
    assert (summary.n, summary.median, summary.minimum, summary.maximum) == (3, 0.2, 0.1, 0.3)
    assert summary.p90 == pytest.approx(0.28)


def test_durations_and_rates_read_as_people_write_them() -> None:
    assert format_seconds(1.1734) == "1.17 s"
    assert format_seconds(0.193) == "193 ms"
    assert format_seconds(0.0142) == "14.2 ms"
    assert format_seconds(0.00038) == "0.380 ms"
    assert format_seconds(12.34) == "12.3 s"
    assert format_rate(612 * MB) == "612 MB/s"
    assert format_rate(27.44 * MB) == "27.4 MB/s"


ROWS_FIXED = [
    Row("cold", "raw ssh, cold", "cold ssh", "Latency"),
    Row("mine", "my first call", "mine", "Latency", "cold"),
    Row("keep", "keep warm", "keep", "Latency", "cold"),
    Row("pipe", "ssh cat pipe", "pipe", "Throughput", None, 200 * MB),
    Row("big", "100 MB round trip", "big", "Throughput", "pipe", 200 * MB),
]


def fixed_results() -> Results:
    results = Results()
    for seconds in (0.2, 0.19, 0.21):
        results.add("cold", seconds)
    for seconds in (0.3, 0.31, 0.29):
        results.add("mine", seconds)
    results.fail("mine", "ssh exited 255")
    results.add("pipe", 0.4)   # 200 MB in 0.4 s: 500 MB/s
    results.add("big", 1.0)    # 200 MB in 1 s: 200 MB/s
    results.notes["keep"] = "not implemented: keep_warm=True failed"
    return results


def test_table_shows_medians_ratios_failures_and_why_a_row_is_empty() -> None:
    text = render_tables(ROWS_FIXED, fixed_results())
    lines = text.splitlines()
    assert "### Latency" in lines and "### Throughput" in lines
    mine = next(line for line in lines if line.startswith("| my first call"))
    assert "| 300 ms |" in mine and "| 1.50x |" in mine and "3 (1 failed)" in mine and "cold ssh" in mine
    keep = next(line for line in lines if line.startswith("| keep warm"))
    assert "not implemented: keep_warm=True failed" in keep and "| 0 |" in keep
    big = next(line for line in lines if line.startswith("| 100 MB round trip"))
    assert "| 200 MB/s |" in big and "| 0.40x |" in big


def test_targets_are_met_missed_or_not_measured() -> None:
    rows = {row.key: row for row in ROWS_FIXED}
    results = fixed_results()
    slower = evaluate(Target("first call <= 1.1x cold ssh", "mine", "cold", 1.1), rows, results)
    assert slower.status == "not met" and slower.measured == pytest.approx(1.5)
    assert "1.50x" in slower.detail
    looser = evaluate(Target("first call <= 2x cold ssh", "mine", "cold", 2.0), rows, results)
    assert looser.status == "met"
    rate = evaluate(Target(">= 50% of the pipe", "big", "pipe", 0.5, at_least=True), rows, results)
    assert rate.status == "not met" and rate.measured == pytest.approx(0.4)
    absolute = evaluate(Target("<= 1 s", "cold", None, 1.0), rows, results)
    assert absolute.status == "met" and absolute.measured == pytest.approx(0.2)
    missing = evaluate(Target("keep_warm <= 1 ms", "keep", None, 0.001), rows, results)
    assert missing.status == "not measured" and "not implemented" in missing.detail


def test_phase_table_medians_and_the_unaccounted_rest() -> None:
    records = [PhaseRecord(0.100, {"connect": 0.020, "execute": 0.060, "collect": 0.001}),
               PhaseRecord(0.120, {"connect": 0.030, "execute": 0.070, "collect": 0.001})]
    text = render_phases({"warm call (openssh)": records})
    row = next(line for line in text.splitlines() if line.startswith("| warm call"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells == ["warm call (openssh)", "2", "110 ms", "25.0 ms", "—", "65.0 ms", "1.00 ms", "19.0 ms"]


def test_importtime_totals_count_top_level_modules_only() -> None:
    stderr = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:       100 |        100 |     typing_extensions",
        "import time:       200 |        300 |   typer",
        "import time:        50 |        400 | remote_exec",
        "import time:        10 |         10 | encodings",
    ])
    assert _parse_importtime(stderr) == {"remote_exec": 400, "encodings": 10}


def test_every_target_names_rows_that_exist() -> None:
    keys = {row.key for row in ROWS}
    for target in TARGETS:
        assert target.row in keys
        assert target.reference is None or target.reference in keys
    for row in ROWS:
        assert row.reference is None or row.reference in keys


def test_phase_table_says_how_many_calls_had_a_phase() -> None:
    records = [PhaseRecord(0.5, {"connect": 0.2, "upload": 0.1}), PhaseRecord(0.3, {"connect": 0.2}),
               PhaseRecord(0.3, {"connect": 0.2})]
    text = render_phases({"rx run": records})
    row = next(line for line in text.splitlines() if line.startswith("| rx run"))
    assert "| 100 ms (1 of 3) |" in row


def test_rx_runs_from_a_venv_of_its_own_without_start_up_hooks(tmp_path: Path) -> None:
    """The whole-command rows time rx as a user installs it: its console script in a venv of its own, which
    runs no .pth hook of the environment that runs the benchmarks (an editable finder, a CA injector)."""
    from benchmarks.suite import REPO, _rx_env, _site_packages

    python, command = _rx_env(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *_site_packages()]))
    helped = subprocess.run([*command, "--help"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert helped.returncode == 0, helped.stderr
    assert "run" in helped.stdout
    started = subprocess.run([str(python), "-X", "importtime", "-c", "pass"], capture_output=True, text=True,
                             env=env, timeout=60, check=False)
    loaded = {line.rsplit("|", 1)[-1].strip() for line in started.stderr.splitlines()}
    assert "site" in loaded
    assert not any(name.startswith("__editable__") or name in ("certifi", "_distutils_hack") for name in loaded), loaded


def test_the_delay_relay_adds_its_round_trip_and_keeps_every_byte_in_order() -> None:
    """``--rtt``'s relay (testbed.delay): an echo through it takes at least the round trip, and a large
    transfer arrives whole and in order, its end (EOF) passed on."""
    import asyncio
    import time

    from testbed.delay import relay

    async def scenario() -> tuple[float, bytes]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.read())  # all of it, up to the client's EOF
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        relaying = asyncio.ensure_future(relay(0, "127.0.0.1", port, 0.1, ready))
        reader, writer = await asyncio.open_connection("127.0.0.1", await ready)
        data = os.urandom(3 << 20)
        started = time.monotonic()
        writer.write(data)
        writer.write_eof()
        back = await asyncio.wait_for(reader.read(), 30)
        seconds = time.monotonic() - started
        writer.close()
        relaying.cancel()
        server.close()
        assert back == data
        return seconds, back

    seconds, _ = asyncio.run(scenario())
    assert seconds >= 0.1


def test_a_slow_link_config_reaches_each_host_through_its_relay(tmp_path: Path) -> None:
    """The bench's ``--rtt`` ssh_config: each host's port becomes its relay's, its key looked up under the
    address it has without the relay."""
    from types import SimpleNamespace

    from benchmarks.suite import _slow_link

    config = tmp_path / "ssh_config"
    config.write_text("Host rx-testbed-1\n    HostName 127.0.0.1\n    Port 32768\n    User rx\n", encoding="utf-8")
    bed = SimpleNamespace(ssh_config=config, hosts=[SimpleNamespace(alias="rx-testbed-1", hostname="127.0.0.1",
                                                                    port=32768)])
    relays: list[subprocess.Popen[str]] = []
    try:
        path = _slow_link(bed, 20, tmp_path, relays)
        text = path.read_text(encoding="utf-8")
    finally:
        for process in relays:
            process.terminate()
            process.wait(10)
    assert len(relays) == 1 and "Port 32768" not in text
    assert "    HostKeyAlias [127.0.0.1]:32768\n" in text and "    User rx\n" in text
