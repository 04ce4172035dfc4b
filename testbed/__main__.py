"""``python -m testbed up|down|status``: the Docker sshd testbed from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from testbed import (
    Testbed,
    TestbedError,
    default_slurm_state_dir,
    default_state_dir,
    docker_available,
    down,
    prune,
    slurm_down,
    slurm_up,
    status,
    up,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m testbed",
        description="Docker containers running sshd, reachable with ssh -F <state dir>/ssh_config.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every Docker build line")
    commands = parser.add_subparsers(dest="command", required=True)
    state_help = f"state dir: key pair, ssh_config, known_hosts (default: {default_state_dir()})"

    start = commands.add_parser("up", help="start the hosts (idempotent); build the image when needed")
    start.add_argument("--hosts", type=int, default=1, metavar="N", help="number of hosts (default: 1)")
    start.add_argument("--state-dir", type=Path, metavar="DIR", help=state_help)

    stop = commands.add_parser("down", help="remove this state dir's containers")
    stop.add_argument("--state-dir", type=Path, metavar="DIR", help=state_help)

    commands.add_parser("prune", help="remove containers whose state dir is gone (any testbed)")

    show = commands.add_parser("status", help="list this state dir's containers")
    show.add_argument("--state-dir", type=Path, metavar="DIR", help=state_help)
    show.add_argument("--json", action="store_true", help="print JSON")
    slurm_help = f"state dir of the Slurm cluster (default: {default_slurm_state_dir()})"
    slurm_start = commands.add_parser("slurm-up", help="start the Slurm cluster (login node rx-slurm, c1, c2)")
    slurm_start.add_argument("--state-dir", type=Path, metavar="DIR", help=slurm_help)
    slurm_stop = commands.add_parser("slurm-down", help="remove the Slurm cluster")
    slurm_stop.add_argument("--state-dir", type=Path, metavar="DIR", help=slurm_help)
    return parser


def _table(bed: Testbed) -> str:
    rows = [("ALIAS", "ADDRESS", "CONTAINER")]
    rows += [(h.alias, f"{h.user}@{h.hostname}:{h.port}", h.container_name) for h in bed.hosts]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 failure, 2 usage)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="testbed: %(message)s",
        stream=sys.stderr,
    )
    # The Docker SDK's own loggers stay quiet unless asked.
    for noisy in ("docker", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.INFO if args.verbose else logging.WARNING)
    reason = docker_available()
    if reason is not None:
        print(f"testbed: {reason}", file=sys.stderr)
        return 1
    try:
        if args.command == "slurm-up":
            started = time.monotonic()
            cluster = slurm_up(args.state_dir, log=print)
            print(f"ssh_config: {cluster.ssh_config}   ({time.monotonic() - started:.1f} s)")
            print(f"try: ssh -F {shlex.quote(str(cluster.ssh_config))} {cluster.alias} sinfo")
        elif args.command == "slurm-down":
            print(f"removed {slurm_down(args.state_dir)} container(s)")
        elif args.command == "up":
            started = time.monotonic()
            bed = up(args.hosts, state_dir=args.state_dir)
            print(_table(bed))
            print(f"\nssh_config: {bed.ssh_config}   ({time.monotonic() - started:.1f} s)")
            print(f"try: ssh -F {shlex.quote(str(bed.ssh_config))} {bed.host(0).alias} python3 -V")
        elif args.command == "prune":
            print(f"removed {prune()} container(s)")
        elif args.command == "down":
            removed = down(state_dir=args.state_dir)
            print(f"removed {removed} container(s)")
        else:
            bed_or_none = status(state_dir=args.state_dir)
            if args.json:
                hosts = [] if bed_or_none is None else [vars(h) for h in bed_or_none.hosts]
                state_dir = Path(args.state_dir or default_state_dir()).resolve()
                print(json.dumps({"state_dir": str(state_dir), "hosts": hosts}, indent=2))
            elif bed_or_none is None:
                print("no testbed host is running")
            else:
                print(_table(bed_or_none))
                print(f"\nssh_config: {bed_or_none.ssh_config}")
    except TestbedError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
