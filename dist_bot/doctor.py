"""`dist-bot doctor`: a preflight of the machines a long run is about to use, started like training (torchrun,
srun, the sbatch scripts, submitit) so that it sees what every training process will see.

Every process measures itself: its host, GPU and versions, the CPUs it may use, the free space and write speed of
run.out_dir (one process per node), the read speed of a sample of data.path's training files and the rate of the
recipe's own training loader on them, against the rate the recipe's training step consumes on this device
(timed here, on synthetic data), and the all-reduce bus bandwidth (nccl-tests' busbw: algbw x 2(n-1)/n) at a
few message sizes, among the processes of each node and, with several nodes, across nodes. Rank 0 checks every
row against a threshold and prints a table; a row that fails names the fix. The exit status is 1 when something
would make the run fail (too little disk space, versions that differ between nodes, a data path that does not
read), 0 otherwise; what would only make it slow is a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .config import Config, from_dict, to_dict
from .distributed.env import DistEnv

# thresholds
MIN_CPUS_PER_GPU = 4  # DALI's decode threads, its Python workers and the training thread of one GPU process
DATA_MARGIN = 1.2  # the loader must deliver this many times what the step consumes (a slower one starves it)
MIN_WRITE_MB_S = 100.0  # a ResNet-50 checkpoint (~300 MB with momentum and EMA) in a few seconds
MIN_BUSBW_GB_S = {"node": 20.0, "nodes": 5.0}  # NCCL on GPUs: NVLink/PCIe inside a node; a 50 Gb/s link across
VERSIONS = ("torch", "cuda", "nccl", "cudnn", "dali", "driver", "dist_bot", "python")
STATUS_ORDER = {"ok": 0, "info": 0, "warn": 1, "fail": 2}


def dali_version() -> str | None:
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return None
    import nvidia.dali

    return nvidia.dali.__version__


def gpu_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def host_info(env: DistEnv) -> dict:
    from dist_bot import __version__

    from .data.loader import cpus_per_process

    cuda = env.device.type == "cuda"
    props = torch.cuda.get_device_properties(env.device) if cuda else None
    return {
        # Slurm's name of the node (several slurmds may share a host, as on CI's test cluster), else the host's
        "host": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
        "rank": env.rank,
        "local_rank": env.local_rank,
        "launcher": env.source,
        "device": str(env.device),
        "gpu": props.name if props else None,
        "gpu_mem_gb": round(props.total_memory / 2**30, 1) if props else None,
        "cpu": platform.processor() or platform.machine(),
        "cpus": cpus_per_process(env),
        "affinity": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "dali": dali_version(),
        "driver": gpu_driver() if cuda else None,
        "dist_bot": __version__,
        "python": platform.python_version(),
    }


def disk_info(out_dir: Path, mb: int = 64) -> dict:
    """Free space of ``out_dir`` and the speed of writing ``mb`` MiB to it, fsync included."""
    out_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir).free
    block = os.urandom(2**20)
    fd, name = tempfile.mkstemp(prefix=".doctor-", dir=out_dir)
    try:
        t = time.perf_counter()
        with os.fdopen(fd, "wb") as f:
            for _ in range(mb):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        seconds = time.perf_counter() - t
    finally:
        os.unlink(name)
    return {"free_gb": round(free / 1e9, 1), "write_mb_s": round(mb / seconds, 1)}


def checkpoint_bytes(cfg: Config, num_classes: int) -> int:
    """About what one checkpoint of this recipe takes: weights, momentum and (with EMA) a copy, in fp32."""
    from .models import build_model

    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(cfg.model.name, num_classes).parameters())
    copies = 2 + (cfg.model.ema_decay is not None and cfg.model.ema_decay > 0)
    return params * 4 * copies


def data_info(cfg: Config, env: DistEnv, files: int, batches: int) -> dict:
    """This process's read speed of ``files`` training files (its own share of a sample) and the rate of the
    recipe's training loader over ``batches`` batches after a warm-up of 2."""
    from .data import make_loaders
    from .data.loader import over_epochs
    from .data.source import open_dataset

    train, _ = open_dataset(cfg.data.path)
    paths = [train.samples[i][0] for i in range(env.rank, min(len(train), files * env.world_size), env.world_size)]
    read, t = 0, time.perf_counter()
    for p in paths:
        with contextlib.suppress(OSError, TypeError):
            read += len(Path(p).read_bytes())
    read_s = time.perf_counter() - t
    loader, val = make_loaders(cfg, env)
    try:
        it = over_epochs(loader)
        for _ in range(2):
            next(it)
        n, t = 0, time.perf_counter()
        for _ in range(batches):
            images, _ = next(it)
            n += images.shape[0]
        images.sum().item()
        rate = n / (time.perf_counter() - t)
        del it
    finally:
        loader.close()
        val.close()
    return {
        "loader": type(loader).__name__.removesuffix("Loader").lower(),
        "read_files_per_s": round(len(paths) / read_s, 1) if read_s > 0 else None,
        "read_mb_s": round(read / 1e6 / read_s, 1) if read_s > 0 else None,
        "decode_img_per_s": round(rate, 1),
        "num_classes": loader.num_classes,
    }


def step_info(cfg: Config, env: DistEnv, num_classes: int, steps: int = 5) -> dict:
    """Images per second one training step of the recipe consumes on this device (eager, synthetic data, no
    communication): what the data path must keep up with."""
    from .distributed.strategy import autocast
    from .models import build_model

    model = build_model(cfg.model.name, num_classes).to(env.device)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    b, s = cfg.data.batch_size, cfg.data.image_size
    x = torch.randn(b, 3, s, s, device=env.device).to(memory_format=fmt)
    y = torch.randint(0, num_classes, (b,), device=env.device)

    def step():
        with autocast(cfg.precision, env.device):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        t = time.perf_counter()
        step()
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        times.append(time.perf_counter() - t)
    return {"step_img_per_s": round(b / statistics.median(times), 1), "step_batch": b}


def busbw(group, n: int, sizes: list[int], device: torch.device, iters: int = 5) -> dict[str, float]:
    """nccl-tests' all-reduce bus bandwidth (GB/s) in ``group`` of ``n`` processes at each size (bytes): the
    median time of ``iters`` all-reduces after one warm-up, algbw = size / time, busbw = algbw x 2(n-1)/n."""
    found = {}
    for size in sizes:
        t = torch.ones(size // 4, dtype=torch.float32, device=device)
        dist.all_reduce(t, group=group)
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier(group=group)
            t0 = time.perf_counter()
            dist.all_reduce(t, group=group)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        algbw = size / statistics.median(times) / 1e9
        found[_size_name(size)] = round(algbw * 2 * (n - 1) / n, 3)
    return found


def _size_name(size: int) -> str:
    return f"{size // 2**20} MiB" if size >= 2**20 else f"{size // 2**10} KiB"


def network_info(env: DistEnv, hosts: list[str]) -> dict:
    """busbw inside this process's node and across nodes (one process per node), each at a few sizes. Every
    process makes every group (torch requires it), in the same order."""
    if not env.distributed:
        return {}
    sizes = [2**20, 2**24, 2**26] if env.device.type == "cuda" else [2**16, 2**20, 2**22]
    nodes = sorted(set(hosts), key=hosts.index)
    found = {}
    node_groups = {h: [r for r, x in enumerate(hosts) if x == h] for h in nodes}
    mine = hosts[env.rank]
    for h, ranks in node_groups.items():
        group = dist.new_group(ranks)
        if h == mine and len(ranks) > 1:
            found["node"] = busbw(group, len(ranks), sizes, env.device)
    if len(nodes) > 1:
        leaders = [ranks[0] for ranks in node_groups.values()]
        group = dist.new_group(leaders)
        if env.rank in leaders:
            found["nodes"] = busbw(group, len(leaders), sizes, env.device)
    return found


def wandb_info(cfg: Config) -> dict:
    from .tracking import server_answers, wandb_base_url, wandb_key_configured

    if cfg.wandb.mode in ("disabled", "offline"):
        return {"wandb": f"not used (wandb.mode={cfg.wandb.mode})"}
    if importlib.util.find_spec("wandb") is None:
        return {"wandb": "not installed (pip install 'dist-bot[wandb]')"}
    url = wandb_base_url()
    if not wandb_key_configured():
        return {"wandb": "no API key", "wandb_url": url}
    return {"wandb": "reachable" if server_answers(url) else "unreachable", "wandb_url": url}


def measure(cfg: Config, env: DistEnv, files: int = 200, batches: int = 10) -> dict:
    """This process's record (a collective: every process calls it)."""
    record = host_info(env)
    hosts: list[str] = [record["host"]]
    if env.distributed:
        hosts = [None] * env.world_size
        dist.all_gather_object(hosts, record["host"])
    if env.local_rank == 0:
        try:
            record |= disk_info(Path(cfg.run.out_dir))
        except OSError as e:
            record["disk_error"] = f"{type(e).__name__}: {e}"
    try:
        record |= data_info(cfg, env, files, batches)
    except Exception as e:  # reported as a failed row, not raised: the other rows still count
        record["data_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    num_classes = cfg.model.num_classes or record.get("num_classes") or 1000
    record |= step_info(cfg, env, num_classes)
    record["checkpoint_gb"] = round(checkpoint_bytes(cfg, num_classes) / 1e9, 2)
    record["busbw_gb_s"] = network_info(env, hosts)
    if env.is_main:
        record |= wandb_info(cfg)
    return record


def row(check: str, where: str, value, status: str, threshold: str = "", fix: str = "") -> dict:
    return {"check": check, "where": where, "value": value, "threshold": threshold, "status": status, "fix": fix}


def checked(check: str, where: str, value, ok: bool, threshold: str, fix: str, bad: str = "warn") -> dict:
    """A row judged against its threshold: ok, or ``bad`` with the fix."""
    return row(check, where, value, "ok" if ok else bad, threshold, "" if ok else fix)


def judge(cfg: Config, records: list[dict]) -> list[dict]:
    """One row per check and process (or node), each with a status: ok, info, warn (slow) or fail (fatal)."""
    rows = []
    by_host: dict[str, list[dict]] = {}
    for r in records:
        by_host.setdefault(r["host"], []).append(r)
    for key in VERSIONS:
        values = {r[key] for r in records}
        if len(values) > 1:
            where = ", ".join(f"{h}: {sorted({str(r[key]) for r in rs})[0]}" for h, rs in by_host.items())
            fix = f"install the same {key} on every node (a mixed job can hang or crash in its first collective)"
            rows.append(row(f"{key} version", "all nodes", where, "fail", "the same", fix))
        else:
            value = values.pop()
            rows.append(row(f"{key} version", "all nodes", "-" if value is None else str(value), "ok", "the same"))
    for r in records:
        where = f"{r['host']} rank {r['rank']}"
        gpu = r["device"].startswith("cuda")
        if gpu:
            rows.append(row("GPU", where, f"{r['gpu']} {r['gpu_mem_gb']} GB", "info"))
        fix = (
            f"give each GPU process at least {MIN_CPUS_PER_GPU} CPUs (sbatch --cpus-per-task, and srun -c / "
            "SRUN_CPUS_PER_TASK: srun does not inherit it)"
        )
        cpus_ok = not gpu or r["cpus"] >= MIN_CPUS_PER_GPU
        threshold = f">= {MIN_CPUS_PER_GPU} per GPU" if gpu else ""
        rows.append(checked("CPUs per process", where, r["cpus"], cpus_ok, threshold, fix))
        if "disk_error" in r:
            rows.append(row("run.out_dir", r["host"], r["disk_error"], "fail", "writable", "make run.out_dir writable"))
        elif "free_gb" in r:
            need = r["checkpoint_gb"] * (cfg.run.keep_checkpoints + 1)
            ok = r["free_gb"] >= need
            threshold = f">= {need:.2f} GB ({cfg.run.keep_checkpoints} + 1 checkpoints)"
            fix = "free space, or point run.out_dir elsewhere"
            value = f"{r['free_gb']} GB"
            rows.append(checked("free space of run.out_dir", r["host"], value, ok, threshold, fix, bad="fail"))
            ok = r["write_mb_s"] >= MIN_WRITE_MB_S
            fix = "checkpoints will stall training: a faster file system for run.out_dir"
            value, threshold = f"{r['write_mb_s']} MB/s", f">= {MIN_WRITE_MB_S:.0f} MB/s"
            rows.append(checked("write speed of run.out_dir", r["host"], value, ok, threshold, fix))
        if "data_error" in r:
            fix = "check data.path (dist-bot data check DIR names unreadable files)"
            rows.append(row("data path", where, r["data_error"], "fail", "reads", fix))
        else:
            rows.append(row("data read", where, f"{r['read_mb_s']} MB/s, {r['read_files_per_s']} files/s", "info"))
            need = r["step_img_per_s"] * DATA_MARGIN
            ok = r["decode_img_per_s"] >= need
            fix = (
                "a slow data path: more CPUs per process (data.workers), data.loader=dali, a pack of the data on a "
                "faster file system (dist-bot data pack)"
            )
            value = f"{r['decode_img_per_s']} img/s"
            threshold = f">= {need:.0f} img/s ({DATA_MARGIN}x the step's {r['step_img_per_s']})"
            rows.append(checked(f"data loader ({r['loader']})", where, value, ok, threshold, fix))
        for scope, sizes in r["busbw_gb_s"].items():
            best = max(sizes.values())
            label = "all-reduce busbw inside the node" if scope == "node" else "all-reduce busbw across nodes"
            value = ", ".join(f"{k}: {v} GB/s" for k, v in sizes.items())
            if gpu:
                ok = best >= MIN_BUSBW_GB_S[scope]
                fix = "a slow link: check NCCL_IB_HCA / NCCL_SOCKET_IFNAME, and NCCL_DEBUG=INFO for the transport"
                rows.append(checked(label, where, value, ok, f">= {MIN_BUSBW_GB_S[scope]} GB/s", fix))
            else:
                rows.append(row(label, where, value, "info", "(gloo on CPUs: no threshold)"))
        if "wandb" in r:
            ok = r["wandb"] == "reachable" or r["wandb"].startswith("not used")
            fix = "the run will track offline (`wandb sync` later): " + (
                "wandb login, or set WANDB_API_KEY"
                if "no API key" in r["wandb"]
                else "check the network or WANDB_BASE_URL"
            )
            rows.append(checked("W&B", where, r["wandb"], ok, "", fix))
    return rows


def table(rows: list[dict]) -> str:
    cols = ("status", "check", "where", "value", "threshold", "fix")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols[:-1]}
    lines = ["  ".join(c.ljust(widths.get(c, 0)) for c in cols).rstrip()]
    for r in rows:
        lines.append("  ".join(str(r[c]).ljust(widths.get(c, 0)) for c in cols).rstrip())
    return "\n".join(lines)


def run_doctor(cfg: Config, env: DistEnv, out: Path | None) -> int:
    """Measure every process, judge on rank 0, print the table and write the JSON; the exit status."""
    from .train.build import split_global_batch

    batch, accum = split_global_batch(cfg, env.world_size)
    data = dataclasses.asdict(cfg)
    data["data"]["batch_size"], data["optim"]["grad_accum_steps"] = batch, accum
    cfg = from_dict(data)
    record = measure(cfg, env)
    records = [record]
    if env.distributed:
        records = [None] * env.world_size
        dist.all_gather_object(records, record)
    status = 0
    if env.is_main:
        rows = judge(cfg, records)
        worst = max((STATUS_ORDER[r["status"]] for r in rows), default=0)
        verdict = {0: "ok", 1: "warn", 2: "fail"}[worst]
        out = out or Path(cfg.run.out_dir) / str(cfg.run.name) / "doctor.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {"status": verdict, "world_size": env.world_size, "config": to_dict(cfg), "rows": rows}
        out.write_text(json.dumps(report | {"processes": records}, indent=1, default=str))
        print(table(rows), flush=True)
        print(
            f"\ndoctor: {verdict} ({sum(r['status'] == 'fail' for r in rows)} failed, "
            f"{sum(r['status'] == 'warn' for r in rows)} warnings); {out}",
            flush=True,
        )
        status = 1 if verdict == "fail" else 0
    if env.distributed:  # every process ends with rank 0's verdict
        flag = torch.tensor([status], device=env.device)
        dist.broadcast(flag, 0)
        status = int(flag.item())
    return status
