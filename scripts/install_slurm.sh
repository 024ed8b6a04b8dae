#!/usr/bin/env bash
# Install Slurm 22.05 and munge from Debian's packages, for the tests marked `slurm` (they start their own
# 2-node cluster, tests/system/slurm/cluster.py, and tear it down). Needs root and apt-get: elsewhere it says why
# and exits 1, and those tests skip with the reason. Installed already: returns at once.
set -euo pipefail
if command -v sbatch >/dev/null && [[ -x /usr/sbin/slurmctld && -x /usr/sbin/slurmd && -x /usr/sbin/munged ]]; then
    exit 0
fi
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    echo "install_slurm: not root or no apt-get: the Slurm tests will skip (install slurm-wlm and munge to run them)" >&2
    exit 1
fi
start=$SECONDS
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; }
install || { apt-get update -qq && install; }
echo "install_slurm: slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm) and munge installed in $((SECONDS - start)) s" >&2
