#!/usr/bin/env bash
# Set up a machine for rx development: system packages and Docker (scripts/ensure-docker.sh), then the
# project with its test and dev tools (pip install -e '.[dev,test]'). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-docker.sh
python3 -m pip install --quiet --disable-pip-version-check -e '.[dev,test]'
