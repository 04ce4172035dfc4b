"""Benchmarks of rx against raw ssh, paramiko and its peers (bandsaw, execnet, mitogen) on the Docker testbed.

Run with ``nox -s bench`` or ``python -m benchmarks [--quick]``; see ``benchmarks/README.md`` for what each
row measures and ``benchmarks/RESULTS.md`` for the last full run. Modules: :mod:`benchmarks.suite` (the
run), :mod:`benchmarks.agent` (one process per contender), :mod:`benchmarks.harness` (time limits),
:mod:`benchmarks.report` and :mod:`benchmarks.stats` (the table and the targets).
"""
