"""The sweep of scripts/gpu_speed.sh: which setting trains ResNet-50-D fastest on this GPU, and is DALI as fast.

    python scripts/gpu_speed.py run OUT gpu|rehearse SECONDS_LEFT     # the cases, each recorded in OUT/parts.jsonl
    python scripts/gpu_speed.py summarize OUT gpu|rehearse ELAPSED_S  # OUT/gpu_speed.json and a table on stdout

Each case is one `dist-bot bench train` (dist_bot's own training step on synthetic data, ResNet-50-D, 224 px,
channels_last) in a process of its own, most informative first, so that the deadline cuts the least: the eager
reference against the bare loop and timm, torch.compile's modes, per-GPU batch 256 / 384 / 512, bf16 and fp16,
DDP under torchrun, then the DALI decoder settings (`bench data`: the hardware JPEG decoder off, at DALI's share,
at 0.9) and the fastest compiled setting fed by DALI "mixed" in a run of its own. A record per case: img/s, step
ms, peak GPU memory, the warm-up's seconds (torch.compile's compilation is in them). Standard library only, and
scripts/gpu_check.py's parts runner.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gpu_check import Parts, bench_data, host, importable, main, make_images, read_parts, record_bench

# the mark: NVIDIA's MLPerf Training v4.0 ResNet-50 on H200 (~7,950 img/s per GPU) less ResNet-D's extra cost;
# on an H100 the same stack is 1.11x slower (MLPerf's H100/H200 ratio)
MARK_H200 = 7500.0
H100_RATIO = 1.11
DALI_MARK = 0.95  # DALI-fed over synthetic, the same setting
BATCHES = {"gpu": (256, 384, 512), "rehearse": (8, 12, 16)}


def cases(mode: str, data: Path) -> list[tuple[str, str, list[str], list[str]]]:
    """(name, launcher, overrides, flags) of each case, in the order they run."""
    b256, b384, b512 = BATCHES[mode]
    if mode == "gpu":
        base = ["model.name=resnet50d", "data.image_size=224"]
        flags = ["--steps", "10", "--repeats", "5", "--warmup", "10"]
    else:  # a tiny model and images, the same matrix: what CI runs
        base = ["model.name=resnet10d", "model.num_classes=4", "data.image_size=16", "data.workers=1"]
        flags = ["--steps", "2", "--repeats", "2", "--warmup", "1"]
    base = [*base, "model.channels_last=true", "data.loader=synthetic"]
    alone, reference = [*flags, "--sides", "synthetic"], [*flags, "--sides", "synthetic,bare,timm", "--timm"]

    def case(precision: str, batch: int, compile_mode: str | None) -> list[str]:
        over = [*base, f"precision={precision}", f"data.batch_size={batch}"]
        return over + (["model.compile=true", f"model.compile_mode={compile_mode}"] if compile_mode else [])

    fed = ["data.loader=dali", f"data.path={data}"]
    dali = importable("nvidia.dali") is None
    return [
        ("bf16-b256-eager", "process", case("bf16", b256, None), reference),
        ("bf16-b256-default", "process", case("bf16", b256, "default"), [*flags, "--sides", "synthetic,bare"]),
        ("bf16-b256-reduce-overhead", "process", case("bf16", b256, "reduce-overhead"), alone),
        ("bf16-b384-default", "process", case("bf16", b384, "default"), alone),
        ("bf16-b512-default", "process", case("bf16", b512, "default"), alone),
        ("fp16-b256-default", "process", case("fp16", b256, "default"), alone),
        ("bf16-b256-default-ddp", "torchrun", case("bf16", b256, "default"), alone),
        ("bf16-b256-max-autotune-no-cudagraphs", "process", case("bf16", b256, "max-autotune-no-cudagraphs"), alone),
        *(
            [("bf16-b256-default-dali", "process", [*case("bf16", b256, "default"), *fed], [*flags, "--sides", "data"])]
            if dali
            else []
        ),
    ]


def bench_data_args(mode: str, data: Path) -> list[str]:
    """`dist-bot bench data`: DALI "mixed" with the hardware decoder off, at DALI's default share, at 0.9."""
    size = ["data.image_size=224", "data.batch_size=256", "--batches", "20", "--repeats", "3"]
    if mode != "gpu":
        size = ["data.image_size=16", "data.batch_size=8", "data.workers=1", "--batches", "3", "--repeats", "1"]
    variants = ["dali@data.dali_hw_decoder_load=0", "dali", "dali@data.dali_hw_decoder_load=0.9"]
    return ["configs/demo.yaml", f"data.path={data}", *size, "--loaders", ",".join(variants)]


def run(out: Path, mode: str, seconds_left: float) -> None:
    py = sys.executable
    parts = Parts(out, seconds_left)
    data = out / "data"
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "dist_bot"]
    dali = importable("nvidia.dali")
    if dali:
        parts.record({"part": "dali", "status": "not measured", "why": f"DALI does not import: {dali}"})
    for name, launcher, overrides, flags in cases(mode, data):
        if name.endswith("-dali"):  # the decoder settings first, on images of ImageNet's spread of sizes
            if not make_images(parts, py, mode, data):
                continue
            bench_data(parts, py, mode, data, bench_data_args)
        start = torchrun if launcher == "torchrun" else [py, "-m", "dist_bot"]
        cmd = [*start, "bench", "train", *overrides, *flags]
        record_bench(parts, f"bench-{name}", parts.run(f"bench-{name}", cmd, 240))


def mark_for(device: str) -> float:
    """The img/s mark on this device: MLPerf's H200 figure, scaled down on an H100."""
    return round(MARK_H200 / H100_RATIO, 1) if "H100" in device else MARK_H200


def summarize(out: Path, mode: str, elapsed_s: float) -> dict:
    parts = read_parts(out, "the sweep ended while this case ran")
    table, ratios, decoders = [], {}, []
    for name, entry in parts.items():
        for r in entry.get("records", []):
            if r.get("bench") == "data":
                decoders.append({k: r.get(k) for k in ("variant", "img_per_s", "main_thread_ms")})
            elif "impl" in r and "img_per_s" in r:
                table.append(
                    {
                        "case": name.removeprefix("bench-"),
                        "impl": r["impl"],
                        "precision": r["precision"],
                        "batch": r["global_batch"] // r["processes"],
                        "compile_mode": r["compile_mode"],
                        "launcher": r["launcher"],
                        "img_per_s": round(r["img_per_s"], 1),
                        "step_ms": round(1000 * r["step_s"], 2),
                        "peak_gpu_mem_mb": r.get("max_gpu_mem_mb"),
                        "warmup_s": r.get("warmup_s"),
                        "data_s": round(r["data_s"], 4) if "data_s" in r else None,
                    }
                )
            elif "ratio" in r or "dist_bot_over_timm" in r:
                ratios[name.removeprefix("bench-")] = {
                    k: round(v, 4) for k, v in r.items() if k in ("ratio", "dist_bot_over_timm")
                }
    synthetic = [t for t in table if t["impl"] == "dist_bot"]
    best = max(synthetic, key=lambda t: t["img_per_s"], default=None)
    fed = next((t for t in table if t["case"] == "bf16-b256-default-dali"), None)
    same = next((t for t in synthetic if t["case"] == "bf16-b256-default"), None)
    info = host()
    judged = mode == "gpu"
    mark = mark_for(info.get("device", ""))
    dali_ratio = round(fed["img_per_s"] / same["img_per_s"], 4) if fed and same else None
    marks = {
        "best_img_per_s": {"value": best and best["img_per_s"], "min": mark, "case": best and best["case"]},
        "dali_over_synthetic": {"value": dali_ratio, "min": DALI_MARK, "case": "bf16-b256-default-dali"},
    }
    for m in marks.values():
        m["pass"] = (m["value"] is not None and m["value"] >= m["min"]) if judged else None
    not_measured = {k: e["why"] for k, e in parts.items() if e["status"] != "ok"}
    failed = [k for k, e in parts.items() if e["status"] == "failed"]
    summary = {
        "sweep": "ResNet-50-D on this GPU" if judged else "rehearsal on a CPU: the marks are for a GPU, not judged",
        "mode": mode,
        "host": info,
        "elapsed_s": elapsed_s,
        "passed": bool(parts)
        and not failed
        and (all(m["pass"] for m in marks.values()) if judged else not not_measured),
        "failed": failed,
        "not_measured": not_measured,
        "marks": marks,
        "best": best,
        "cases": table,
        "ratios": ratios,
        "decoders": decoders,
        "parts": parts,
    }
    (out / "gpu_speed.json").write_text(json.dumps(summary, indent=1))
    print(f"{summary['sweep']}: {info.get('device')}, torch {info.get('torch')}, CUDA {info.get('cuda')}")
    head = ("case", "impl", "img_per_s", "step_ms", "peak_gpu_mem_mb", "warmup_s", "data_s")
    print(" | ".join(head))
    for t in table:
        print(" | ".join(str(t[k]) for k in head))
    for d in decoders:
        print(f"decoder {d['variant']}: {d['img_per_s']} img/s")
    print(json.dumps({k: summary[k] for k in ("passed", "failed", "not_measured", "marks", "ratios")}, indent=1))
    return summary


if __name__ == "__main__":
    main(run, summarize)
