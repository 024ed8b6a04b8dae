#!/usr/bin/env bash
# The one prepared check for a lent GPU (the workplace's device machine: torch is installed there, nothing can
# be downloaded; extra wheels travel in .whl/) or any CUDA host with dist_bot's requirements:
#   1. the tests marked `gpu` (tests/test_gpu.py): NCCL DDP in one process, fp16 with GradScaler,
#      channels_last, SyncBatchNorm, a training run on the GPU, DALI "mixed" decoding (if DALI is there);
#   2. `dist-bot bench train` for resnet50d at 224 px, batch 256, channels_last: fp16 and bf16, each with and
#      without torch.compile (dist_bot's step against a bare PyTorch loop);
#   3. one JSON summary, OUT/gpu_check.json (logs beside it).
#
#   bash scripts/gpu_check.sh [OUT]      # device: run(command="bash scripts/gpu_check.sh $OUT", timeout_s=590)
#
# BENCH_ARGS="key=value ..." is appended to the bench's overrides (a smoke test on CPU: a small model).
# About 5 minutes on an H200, most of it torch.compile; every part has its own timeout so one hang cannot
# eat the machine's budget.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels (e.g. DALI, submitit): install beside torch
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$OUT/gpu.txt" 2>&1

echo "== tests marked gpu"
timeout 300 $PY -m pytest tests/test_gpu.py -m gpu -rs -q -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" \
    2>&1 | tee "$OUT/gpu_tests.log"

echo "== bench train: resnet50d, 224 px, batch 256, channels_last"
: > "$OUT/bench.jsonl"
for precision in fp16 bf16; do
    for compile in false true; do
        timeout 240 $PY -m dist_bot bench train model.name=resnet50d data.image_size=224 data.batch_size=256 \
            precision=$precision model.channels_last=true model.compile=$compile ${BENCH_ARGS:-} \
            --steps 20 --warmup 5 --repeats 2 \
            >> "$OUT/bench.jsonl" 2>> "$OUT/bench.log" || echo "bench $precision compile=$compile failed: $OUT/bench.log"
    done
done
cat "$OUT/bench.jsonl"

$PY - "$OUT" "$((SECONDS - start))" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, seconds = Path(sys.argv[1]), int(sys.argv[2])
summary = {"gpu": (out / "gpu.txt").read_text().strip().splitlines(), "seconds": seconds}
try:
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = [(c.get("name"), "failed" if c.find("failure") is not None or c.find("error") is not None
              else "skipped" if c.find("skipped") is not None else "passed") for c in suite.iter("testcase")]
    summary["tests"] = dict(cases)
except (OSError, ET.ParseError) as e:
    summary["tests"] = f"no test report: {e}"
records = [json.loads(x) for x in (out / "bench.jsonl").read_text().splitlines() if x.startswith("{")]
summary["bench_train"] = [
    {k: r.get(k) for k in ("precision", "compile", "impl", "img_per_s", "ratio", "overhead_pct")} for r in records
]
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PY
