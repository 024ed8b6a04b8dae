# Sourced by gpu_check.sh and gpu_speed.sh: make a CUDA host's Python ready for dist_bot without touching its torch.
# Needs PY (the Python) and OUT (the output folder, with parts.jsonl) set.

# prepare_host SITE: install the wheels carried in .whl/ (e.g. DALI, for hosts without a network) into SITE, check
# for torch >= 2.4 (else record the failed setup part and return 1), install dist_bot without dependencies if it
# does not import (or put the checkout on PYTHONPATH).
prepare_host() {
    local site=$1
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl &&
            export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if ! "$PY" -c "import torch, sys; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 4))" 2> "$OUT/python.log"; then
        echo "{\"part\": \"setup\", \"status\": \"failed\", \"why\": \"$PY has no torch >= 2.4 (see python.log)\"}" >> "$OUT/parts.jsonl"
        return 1
    fi
    if ! "$PY" -c "import dist_bot" 2> /dev/null; then
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/python.log" 2>&1 ||
            export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
}
