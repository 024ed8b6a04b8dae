"""The parts of scripts/gpu_check.sh, run under one deadline, and the summary it writes on exit.

    python scripts/gpu_check.py run OUT gpu|rehearse SECONDS_LEFT     # the parts, each recorded in OUT/parts.jsonl
    python scripts/gpu_check.py summarize OUT gpu|rehearse ELAPSED_S  # OUT/gpu_check.json from what is there

Standard library only (plus what dist_bot itself needs), so it runs on any host the check is meant for.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

RESERVE_S = 15  # kept back from every part for the summary
# name: (threshold, what it is)
MARKS = {
    "bf16_eager_img_per_s": (3000.0, "dist_bot's step, bf16, eager, synthetic data"),
    "best_img_per_s": (3600.0, "dist_bot's fastest setting on synthetic data"),
    "dist_bot_over_bare": (0.97, "the lowest ratio to the bare PyTorch loop over all runs (process and torchrun)"),
    "dali_over_synthetic": (0.95, "DALI-fed (a run of its own) over synthetic, bf16, eager"),
    "dali_over_synthetic_compiled": (0.95, "DALI-fed (a run of its own) over synthetic, bf16, compiled"),
}
# a loader-fed run -> the synthetic run it is compared with (same precision and compile mode)
FED = {
    "bf16-eager-dali": "bf16-eager",
    "bf16-compiled-dali": "bf16-compiled",
    "fp16-eager-torch": "fp16-eager",
    "fp16-compiled-torch": "fp16-compiled",
}


def importable(module: str) -> str | None:
    """None if ``module`` imports in a fresh interpreter, else the last line of the error."""
    res = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    return None if res.returncode == 0 else (res.stderr.strip().splitlines() or ["import failed"])[-1]


def bench_runs(mode: str, data: Path) -> list[tuple[str, str, list[str], list[str]]]:
    """(name, launcher, overrides, flags) of the bench matrix, most needed first (the deadline cuts the last).
    Every loader-fed case runs alone (--sides data), eager and compiled; DDP is timed under torchrun (one
    process, NCCL) beside the plain process. The rehearsal's tiny model and images keep the matrix's shape."""
    if mode == "gpu":
        base = ["model.name=resnet50d", "data.image_size=224", "data.batch_size=256"]
        flags = ["--steps", "10", "--repeats", "5", "--warmup", "10"]
    else:
        # batch 8 over 16 training images: epochs of 2 steps, shorter than a timed block; 16 px, as bf16 and fp16
        # are ~10x slower than fp32 on a CPU (CI runs this)
        base = ["model.name=resnet10d", "model.num_classes=4", "data.image_size=16", "data.batch_size=8"]
        base.append("data.workers=1")
        flags = ["--steps", "3", "--repeats", "2", "--warmup", "1"]
    base.append("model.channels_last=true")
    compiled = traced = ["model.compile=true"]
    if mode == "rehearse":
        # inductor compiles the first compiled case (and, from its cache, the DALI-fed one beside it); the other
        # compiled cases go through the same tracing (dynamo, AOT autograd: graph breaks, DDP's bucket splits,
        # fp16's GradScaler) with aot_eager: inductor's C++ kernels for a CPU, not the GPU's Triton ones, would
        # take 40 s each on 2 cores and check nothing more of the GPU's run
        traced = [*compiled, "model.compile_backend=aot_eager"]
    fed = [f"data.path={data}"]
    synthetic, alone = [*flags, "--sides", "synthetic,bare"], [*flags, "--sides", "data"]
    with_timm = [*flags, "--sides", "synthetic,bare,timm", "--timm"]
    bf16, fp16 = [*base, "precision=bf16"], [*base, "precision=fp16"]
    bf16_dali, fp16_torch = [*bf16, "data.loader=dali", *fed], [*fp16, "data.loader=torch", *fed]
    bf16, fp16 = [*bf16, "data.loader=synthetic"], [*fp16, "data.loader=synthetic"]
    dali = importable("nvidia.dali") is None
    runs = [
        ("bf16-eager", "process", bf16, with_timm),
        ("bf16-compiled", "process", [*bf16, *compiled], synthetic),
        *([("bf16-compiled-dali", "process", [*bf16_dali, *compiled], alone)] if dali else []),
        ("bf16-eager-ddp", "torchrun", bf16, synthetic),
        ("bf16-compiled-ddp", "torchrun", [*bf16, *traced], synthetic),
        *([("bf16-eager-dali", "process", bf16_dali, alone)] if dali else []),
        ("fp16-eager", "process", fp16, synthetic),
        ("fp16-eager-torch", "process", fp16_torch, alone),
        ("fp16-compiled", "process", [*fp16, *traced], synthetic),
        ("fp16-compiled-torch", "process", [*fp16_torch, *traced], alone),
    ]
    return runs


def bench_data_args(mode: str, data: Path) -> list[str]:
    """`dist-bot bench data`: the loaders alone on this device. DALI "mixed" with the hardware JPEG decoder off
    (0), at DALI's default share (0.65) and at 0.9; the DataLoader."""
    if mode == "gpu":
        size = ["data.image_size=224", "data.batch_size=256", "--batches", "20", "--repeats", "3"]
    else:
        size = ["data.image_size=16", "data.batch_size=8", "data.workers=1", "--batches", "3", "--repeats", "1"]
    variants = ["torch"]
    if importable("nvidia.dali") is None:
        variants = ["dali@data.dali_hw_decoder_load=0", "dali", "dali@data.dali_hw_decoder_load=0.9", "torch"]
    return ["configs/demo.yaml", f"data.path={data}", *size, "--loaders", ",".join(variants)]


class Parts:
    """Runs commands as parts of the check, each within what is left of the deadline, and records them."""

    def __init__(self, out: Path, seconds_left: float):
        self.out, self.deadline = out, time.monotonic() + seconds_left
        self.log = out / "parts.jsonl"

    def record(self, entry: dict) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def run(self, name: str, cmd: list[str], cap_s: float) -> subprocess.CompletedProcess | None:
        left = self.deadline - time.monotonic() - RESERVE_S
        if left < 5:
            self.record({"part": name, "status": "not measured", "why": "the check's deadline came first"})
            return None
        self.record({"part": name, "status": "started"})
        t0 = time.monotonic()
        stdout, stderr = self.out / f"{name}.out", self.out / f"{name}.log"
        try:
            with open(stdout, "w") as o, open(stderr, "w") as e:
                res = subprocess.run(cmd, stdout=o, stderr=e, text=True, timeout=min(cap_s, left))
        except subprocess.TimeoutExpired:
            why = "the check's deadline came first" if cap_s > left else f"timed out after {cap_s:.0f} s"
            self.record({"part": name, "status": "not measured", "why": f"{why} (see {stderr.name})"})
            return None
        res.stdout, res.stderr = stdout.read_text(), stderr.read_text()
        res.seconds = round(time.monotonic() - t0, 1)
        return res


def run(out: Path, mode: str, seconds_left: float) -> None:
    py = sys.executable
    parts = Parts(out, seconds_left)
    # 1. the gpu tests (on a CPU they skip, each saying why)
    xml = out / "gpu_tests.xml"
    res = parts.run(
        "tests",
        [
            py,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "tests/system/test_gpu.py",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            f"--junitxml={xml}",
        ],
        cap_s=260,
    )
    if res is not None:
        cases = junit_cases(xml)
        failed = [c for c, r in cases.items() if r["result"] == "failed"]
        status = "failed" if failed or res.returncode not in (0, 5) or not cases else "ok"
        parts.record(
            {"part": "tests", "status": status, "seconds": res.seconds, "cases": cases}
            | ({"why": f"failed: {', '.join(failed) or res.stderr[-300:]}"} if status == "failed" else {})
        )
    # 2. images to decode: ImageNet's spread of sizes and modes, out of the page cache
    data = out / "data"
    have_data = make_images(parts, py, mode, data)
    if not have_data:
        parts.record({"part": "data-fed runs", "status": "not measured", "why": "no images were made"})
    # 3. the bench matrix, and the loaders alone
    why = importable("nvidia.dali")
    if why:
        parts.record({"part": "dali", "status": "not measured", "why": f"DALI does not import: {why}"})
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "dist_bot"]
    for i, (name, launcher, overrides, flags) in enumerate(bench_runs(mode, data)):
        if any(o.startswith("data.path") for o in overrides) and not have_data:
            continue
        start = torchrun if launcher == "torchrun" else [py, "-m", "dist_bot"]
        record_bench(
            parts, f"bench-{name}", parts.run(f"bench-{name}", [*start, "bench", "train", *overrides, *flags], 300)
        )
        if i == 2 and have_data:  # after the runs the marks need most: the loaders alone
            bench_data(parts, py, mode, data)
    if have_data and not any(json.loads(x)["part"] == "bench-data" for x in parts.log.read_text().splitlines()):
        bench_data(parts, py, mode, data)


def bench_data(parts: Parts, py: str, mode: str, data: Path, args=bench_data_args) -> None:
    """`dist-bot bench data` with ``args(mode, data)``, recorded as the part bench-data."""
    res = parts.run("bench-data", [py, "-m", "dist_bot", "bench", "data", *args(mode, data)], cap_s=180)
    record_bench(parts, "bench-data", res)


def record_bench(parts: Parts, name: str, res) -> None:
    """A bench command's JSON lines as part ``name``'s records, or why it failed (nothing if it did not run)."""
    if res is None:
        return
    records = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    ok = res.returncode == 0 and bool(records)
    entry = {"part": name, "status": "ok" if ok else "failed", "seconds": res.seconds}
    parts.record(entry | ({"records": records} if ok else {"why": res.stderr[-800:]}))


def make_images(parts: Parts, py: str, mode: str, data: Path) -> bool:
    """~2,000 fake JPEGs of ImageNet's spread of sizes and modes (a few tiny ones when rehearsing) in ``data``, out
    of the page cache: whether there are images to decode."""
    size = ["--images", "2000"] if mode == "gpu" else ["--images", "20", "--size", "48x40", "--classes", "4"]
    res = parts.run("data", [py, "-m", "dist_bot", "data", "fake", str(data), "--imagenet-sizes", *size], cap_s=120)
    if res is not None:
        ok = res.returncode == 0
        parts.record(
            {"part": "data", "status": "ok" if ok else "failed", "seconds": res.seconds}
            | ({"dataset": json.loads(res.stdout)} if ok else {"why": res.stderr[-500:]})
        )
    return (data / "train").is_dir()


def read_parts(out: Path, ended: str) -> dict[str, dict]:
    """OUT/parts.jsonl as {part: its last entry}; a part still "started" is not measured, for ``ended``."""
    parts: dict[str, dict] = {}
    log = out / "parts.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        entry = json.loads(line)
        parts[entry.pop("part")] = entry
    for entry in parts.values():
        if entry["status"] == "started":
            entry.update(status="not measured", why=ended)
    return parts


def main(run, summarize) -> None:
    """`run OUT MODE SECONDS_LEFT` or `summarize OUT MODE ELAPSED_S`, the two commands of the shell script."""
    command, out, mode, number = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    (run if command == "run" else summarize)(out, mode, number)


def junit_cases(xml: Path) -> dict[str, dict]:
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return {}
    cases = {}
    for case in root.iter("testcase"):
        for tag, result in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                cases[case.get("name")] = {"result": result, "why": (node.get("message") or "")[:300]}
                break
        else:
            cases[case.get("name")] = {"result": "passed"}
    return cases


def host() -> dict:
    """This host's Python, torch, CUDA, device and cuDNN, and whether DALI and timm import (each as `importable`
    says it), from one fresh interpreter: an import of torch costs seconds, and the summary runs within the exit
    trap's 30 s (three interpreters took 18 s of them on a busy 2-core host)."""
    code = (
        "import json, platform, torch\n"
        "c = torch.cuda.is_available()\n"
        "info = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda if c "
        "else None, 'device': torch.cuda.get_device_name(0) if c else 'cpu', 'cudnn': torch.backends.cudnn.version() "
        "if c else None}\n"
        "for module in ('nvidia.dali', 'timm'):\n"
        "    try:\n"
        "        __import__(module)\n"
        "        info[module.split('.')[-1]] = 'importable'\n"
        "    except Exception as e:\n"
        "        info[module.split('.')[-1]] = f'not importable: {type(e).__name__}: {e}'\n"
        "print(json.dumps(info))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if res.returncode == 0:
        return json.loads(res.stdout.splitlines()[-1])
    return {"error": res.stderr[-300:]}


def summarize(out: Path, mode: str, elapsed_s: float) -> dict:
    parts = read_parts(out, "the check ended while this part ran")
    table, ratios, sides_skipped, loaders = [], {}, {}, []
    for name, entry in parts.items():
        for r in entry.get("records", []):
            if r.get("bench") == "data":
                loaders.append({k: r.get(k) for k in ("variant", "img_per_s", "main_thread_ms", "device", "workers")})
            elif "impl" in r and "img_per_s" in r:
                table.append(
                    {
                        "run": name.removeprefix("bench-"),
                        "impl": r["impl"],
                        "launcher": r["launcher"],
                        "loader": r["loader"],
                        "compile_mode": r["compile_mode"],
                        "compile_backend": r.get("compile_backend"),
                        "img_per_s": round(r["img_per_s"], 1),
                        "step_s": round(r["step_s"], 4),
                        "data_s": round(r["data_s"], 4) if "data_s" in r else None,
                        "max_gpu_mem_mb": r.get("max_gpu_mem_mb"),
                    }
                )
            elif "skipped" in r:
                sides_skipped[f"{name} {r['impl']}"] = {"status": "not measured", "why": r["skipped"]}
            elif "ratio" in r:
                ratios[name.removeprefix("bench-")] = {
                    k: round(v, 4) for k, v in r.items() if k in ("ratio", "dist_bot_over_timm")
                }
    parts |= sides_skipped
    synthetic = {t["run"]: t["img_per_s"] for t in table if t["impl"] == "dist_bot"}
    for fed, base in FED.items():  # each loader-fed run against the synthetic run of the same settings
        got = next((t["img_per_s"] for t in table if t["run"] == fed and t["impl"].startswith("dist_bot+")), None)
        if got is not None and base in synthetic:
            ratios.setdefault(fed, {})["data_over_synthetic"] = round(got / synthetic[base], 4)
    values = {
        "bf16_eager_img_per_s": synthetic.get("bf16-eager"),
        "best_img_per_s": max(synthetic.values(), default=None),
        "dist_bot_over_bare": min((r["ratio"] for r in ratios.values() if "ratio" in r), default=None),
        "dali_over_synthetic": ratios.get("bf16-eager-dali", {}).get("data_over_synthetic"),
        "dali_over_synthetic_compiled": ratios.get("bf16-compiled-dali", {}).get("data_over_synthetic"),
    }
    judged = mode == "gpu"
    marks = {}
    for name, (threshold, what) in MARKS.items():
        v = values[name]
        marks[name] = {
            "value": v,
            "min": threshold,
            "what": what,
            "pass": (v is not None and v >= threshold) if judged else None,
        }
    not_measured = {k: e["why"] for k, e in parts.items() if e["status"] != "ok"}
    for name, v in values.items():
        if v is None:
            not_measured.setdefault(f"mark {name}", "no run measured it (see the parts above)")
    failed = [k for k, e in parts.items() if e["status"] == "failed"]
    summary = {
        "check": "dist_bot on a CUDA host" if judged else "rehearsal on a CPU: the marks are for a GPU, not judged",
        "mode": mode,
        "host": host(),
        "elapsed_s": elapsed_s,
        # a rehearsal passes when every part ran; a GPU check when, besides, every mark is met
        "passed": bool(parts)
        and not failed
        and (all(m["pass"] for m in marks.values()) if judged else not not_measured),
        "failed": failed,
        "not_measured": not_measured,
        "marks": marks,
        "table": table,
        "ratios": ratios,
        "loaders": loaders,
        "parts": parts,
    }
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    brief = {k: summary[k] for k in ("check", "passed", "failed", "not_measured", "marks", "ratios", "loaders")}
    print(json.dumps(brief | {"table": table}, indent=1))
    return summary


if __name__ == "__main__":
    main(run, summarize)
