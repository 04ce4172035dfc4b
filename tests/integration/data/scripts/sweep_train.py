"""A training script for ``rx map`` sweeps: prints its arguments and GPUs, fails for one seed while the host
has /tmp/rx-fail-<seed> (so a test can fix the cause on the host and rerun), or sleeps long (Ctrl-C test)."""

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--sleep", type=float, default=0.2)
args = parser.parse_args()
print(f"lr={args.lr} seed={args.seed} gpu={os.environ.get('CUDA_VISIBLE_DEVICES')} pid={os.getpid()}", flush=True)
time.sleep(args.sleep)
with open("metrics.txt", "w") as out:
    out.write(f"{args.lr} {args.seed}\n")
sys.exit(5 if os.path.exists(f"/tmp/rx-fail-{args.seed}") else 0)
