#!/usr/bin/env bash
# The README's first command: set up, start one testbed sshd host, and offload examples/pi.py to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m testbed up --hosts 1
export RX_SSH_CONFIG="$PWD/.testbed/ssh_config"
echo "+ rx run --remote rx-testbed-1 examples/pi.py --rounds 3"
rx run --remote rx-testbed-1 examples/pi.py --rounds 3
echo "+ rx show latest"
rx show latest
run_dir=$(rx show latest --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["run_id"])')
echo "+ cat .rx/runs/$run_dir/files/pi.json   # written on the remote, landed here"
cat ".rx/runs/$run_dir/files/pi.json"
