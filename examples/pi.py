"""Estimate pi in a few rounds, printing progress as it goes, and write the estimate to pi.json.

    rx run examples/pi.py --rounds 5 --samples 200000              # locally, through the rx pipeline
    rx run --remote rx-testbed-1 examples/pi.py --rounds 5         # on a testbed host

The file it writes lands in the run's files/ folder of the local workspace.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

from montecarlo import estimate_pi


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between rounds")
    args = parser.parse_args(argv)
    estimates = []
    for round_number in range(1, args.rounds + 1):
        estimates.append(estimate_pi(args.samples, seed=round_number))
        mean = sum(estimates) / len(estimates)
        print(f"round {round_number}/{args.rounds}: pi ~ {mean:.5f}", flush=True)
        time.sleep(args.pause)
    with open("pi.json", "w") as stream:
        json.dump({"pi": mean, "rounds": args.rounds, "samples": args.samples,
                   "host": platform.node(), "python": sys.version.split()[0]}, stream, indent=1)
    print(f"wrote pi.json on {platform.node()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
