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
    "dist_bot_over_bare": (0.97, "the lowest ratio to the bare PyTorch loop over all runs"),
    "dali_over_synthetic": (0.95, "DALI-fed over synthetic, same run"),
}


def importable(module: str) -> str | None:
    """None if ``module`` imports in a fresh interpreter, else the last line of the error."""
    res = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    return None if res.returncode == 0 else (res.stderr.strip().splitlines() or ["import failed"])[-1]


def bench_runs(mode: str, data: Path) -> list[tuple[str, list[str], list[str]]]:
    """(name, overrides, flags) of the bench matrix; the rehearsal's tiny model and images keep its shape."""
    if mode == "gpu":
        base = ["model.name=resnet50d", "data.image_size=224", "data.batch_size=256"]
        flags = ["--steps", "10", "--repeats", "5", "--warmup", "10"]
    else:
        # batch 8 over 16 training images: epochs of 2 steps, shorter than a timed block; 16 px, as bf16 and fp16
        # are ~10x slower than fp32 on a CPU (CI runs this)
        base = ["model.name=resnet18d", "model.num_classes=4", "data.image_size=16", "data.batch_size=8"]
        base.append("data.workers=1")
        flags = ["--steps", "3", "--repeats", "2", "--warmup", "1"]
    base.append("model.channels_last=true")
    dali = importable("nvidia.dali") is None
    first = ["data.loader=dali", f"data.path={data}"] if dali else ["data.loader=synthetic"]
    return [
        ("bf16-eager" + ("-dali" if dali else ""), [*base, "precision=bf16", *first], [*flags, "--timm"]),
        ("bf16-compiled", [*base, "precision=bf16", "model.compile=true"], flags),
        ("fp16-eager-torch", [*base, "precision=fp16", "data.loader=torch", f"data.path={data}"], flags),
        ("fp16-compiled", [*base, "precision=fp16", "model.compile=true"], flags),
    ]


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
            "tests/test_gpu.py",
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
    # 2. images to decode
    data = out / "data"
    size = ["--images", "2000"] if mode == "gpu" else ["--images", "20", "--size", "48x40", "--classes", "4"]
    res = parts.run("data", [py, "-m", "dist_bot", "data", "fake", str(data), *size], cap_s=90)
    if res is not None:
        ok = res.returncode == 0
        parts.record(
            {"part": "data", "status": "ok" if ok else "failed", "seconds": res.seconds}
            | ({"dataset": json.loads(res.stdout)} if ok else {"why": res.stderr[-500:]})
        )
    if not (data / "train").is_dir():
        parts.record({"part": "data-fed runs", "status": "not measured", "why": "no images were made"})
    # 3. the bench matrix
    why = importable("nvidia.dali")
    if why:
        parts.record({"part": "dali", "status": "not measured", "why": f"DALI does not import: {why}"})
    for name, overrides, flags in bench_runs(mode, data):
        if any(o.startswith("data.path") for o in overrides) and not (data / "train").is_dir():
            continue
        res = parts.run(f"bench-{name}", [py, "-m", "dist_bot", "bench", "train", *overrides, *flags], cap_s=300)
        if res is None:
            continue
        records = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
        ok = res.returncode == 0 and records
        entry = {"part": f"bench-{name}", "status": "ok" if ok else "failed", "seconds": res.seconds}
        parts.record(entry | ({"records": records} if ok else {"why": res.stderr[-800:]}))


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
    code = (
        "import json, torch, platform; c = torch.cuda.is_available(); print(json.dumps({'python': "
        "platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda if c else None, "
        "'device': torch.cuda.get_device_name(0) if c else 'cpu', 'cudnn': torch.backends.cudnn.version() "
        "if c else None}))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    info = json.loads(res.stdout) if res.returncode == 0 else {"error": res.stderr[-300:]}
    for module in ("nvidia.dali", "timm"):
        why = importable(module)
        info[module.split(".")[-1]] = "importable" if why is None else f"not importable: {why}"
    return info


def summarize(out: Path, mode: str, elapsed_s: float) -> dict:
    parts: dict[str, dict] = {}
    log = out / "parts.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        entry = json.loads(line)
        parts[entry.pop("part")] = entry
    for entry in parts.values():
        if entry["status"] == "started":  # the check was killed while this part ran
            entry.update(status="not measured", why="the check ended while this part ran")
    table, ratios, sides_skipped = [], {}, {}
    for name, entry in parts.items():
        for r in entry.get("records", []):
            if "impl" in r and "img_per_s" in r:
                table.append(
                    {
                        "run": name.removeprefix("bench-"),
                        "impl": r["impl"],
                        "img_per_s": round(r["img_per_s"], 1),
                        "step_s": round(r["step_s"], 4),
                        "max_gpu_mem_mb": r.get("max_gpu_mem_mb"),
                    }
                )
            elif "skipped" in r:
                sides_skipped[f"{name} {r['impl']}"] = {"status": "not measured", "why": r["skipped"]}
            elif "ratio" in r:
                ratios[name.removeprefix("bench-")] = {
                    k: round(v, 4) for k, v in r.items() if k in ("ratio", "data_over_synthetic", "dist_bot_over_timm")
                }
    parts |= sides_skipped
    synthetic = {t["run"]: t["img_per_s"] for t in table if t["impl"] == "dist_bot"}
    values = {
        "bf16_eager_img_per_s": next((v for k, v in synthetic.items() if k.startswith("bf16-eager")), None),
        "best_img_per_s": max(synthetic.values(), default=None),
        "dist_bot_over_bare": min((r["ratio"] for r in ratios.values()), default=None),
        "dali_over_synthetic": next((r.get("data_over_synthetic") for k, r in ratios.items() if "dali" in k), None),
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
        "parts": parts,
    }
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    brief = {k: summary[k] for k in ("check", "passed", "failed", "not_measured", "marks", "ratios")}
    print(json.dumps(brief | {"table": table}, indent=1))
    return summary


if __name__ == "__main__":
    command, out, mode, number = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    if command == "run":
        run(out, mode, number)
    else:
        summarize(out, mode, number)
