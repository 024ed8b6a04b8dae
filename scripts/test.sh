#!/usr/bin/env bash
# Set everything up and run the tests: the README's test command; .ci/run runs it with -rs.
#
#   bash scripts/test.sh [pytest arguments]
#
# As root on Debian it also installs Slurm and munge (scripts/install_slurm.sh), and the tests marked
# `slurm` then must run: they bring up a real 2-node cluster in a temp folder and tear it down at the end,
# even when tests fail (and this script's exit trap stops it if pytest itself is killed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
if bash scripts/install_slurm.sh; then
    export DIST_BOT_REQUIRE_SLURM=1
    DIST_BOT_SLURM_DIR=$(mktemp -d /tmp/dist_bot_slurm.XXXXXX)
    export DIST_BOT_SLURM_DIR
    trap '.venv/bin/python tests/system/slurm/cluster.py down "$DIST_BOT_SLURM_DIR" --remove' EXIT
fi
.venv/bin/python -m pytest "$@"
