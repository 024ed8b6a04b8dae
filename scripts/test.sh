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
# Two pytest workers, each taking whole files (a file's module fixtures run once): most tests launch processes
# that leave a core idle part of the time (start-up, waits), so two of them at once use CI's 2 cores better.
# PYTEST_WORKERS=0 runs them in this process.
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
