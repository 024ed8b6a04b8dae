#!/usr/bin/env bash
# Make .venv and install dist_bot with every extra (DALI, DeepSpeed, W&B, submitit) and the dev tools,
# at the versions pinned in requirements.lock. Idempotent: when .venv was set up from the same
# pyproject.toml, requirements.lock and this script, it returns at once.
#
#   bash scripts/setup.sh            # PYTHON=python3.11 VENV=.venv to choose
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "setup: dist_bot needs Python >= 3.10; '$PYTHON' is $("$PYTHON" --version 2>&1 || echo missing)." \
         "Set PYTHON=/path/to/python3.11." >&2
    exit 1
fi

stamp="$VENV/.dist_bot-setup"
want="$(cat pyproject.toml requirements.lock scripts/setup.sh | sha256sum | cut -c1-16) $("$PYTHON" -VV | tr -d '\n')"
if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0  # nothing changed since the last setup
fi

start=$SECONDS
echo "setup: installing into $VENV (first time: a few minutes; torch alone is several GB)" >&2
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip=(pip_install -c requirements.lock)
pip_install() {
    # This machine's pip config lists local wheel mirrors that lack most projects: drop pip's noise about them.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
"${pip[@]}" pip setuptools wheel
# DeepSpeed's source build imports torch, so torch goes in first and DeepSpeed builds against it
# without build isolation (an isolated build would download a second, unpinned torch).
"${pip[@]}" torch torchvision
"${pip[@]}" --no-build-isolation deepspeed
"${pip[@]}" -e ".[all,dev]"
echo "$want" > "$stamp"
echo "setup: done in $((SECONDS - start)) s" >&2
