"""Shared fixtures (small real datasets: digits from scikit-learn, an Imagenette subset) and helpers (torchrun
launches, what their output says)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGENETTE = REPO.parent / "shared" / "data" / "imagenette"
PROBES = REPO / "tests" / "probes"  # programs the system tests launch; some tests import their tables
sys.path.insert(0, str(PROBES))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's handwritten digits as JPEG class folders: 1,437 train / 360 val, 32 px."""
    pytest.importorskip("sklearn", reason="the digits dataset needs scikit-learn (pip install -e '.[demo]')")
    from dist_bot.datasets import write_digits

    out = tmp_path_factory.mktemp("digits") / "digits"
    write_digits(out)
    return out


def link_subset(src: Path, out: Path, per_class: dict[str, int]) -> Path:
    """The first N images of every class of each split, as symlinks (the data is never copied)."""
    for split, keep in per_class.items():
        for cls in sorted((src / split).iterdir()):
            (out / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:keep]:
                (out / split / cls.name / f.name).symlink_to(f)
    return out


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory, digits_dir) -> Path:
    """10 train and 4 val digits per class: for tests that only need a run to start and step."""
    return link_subset(digits_dir, tmp_path_factory.mktemp("tiny") / "digits", {"train": 10, "val": 4})


@pytest.fixture(scope="session")
def fake_jpegs(tmp_path_factory) -> Path:
    """40 random 48 x 40 JPEGs in 4 classes (36 train, 4 val), made with PIL alone (no scikit-learn)."""
    from dist_bot.datasets import write_fake_jpegs

    out = tmp_path_factory.mktemp("fake") / "jpegs"
    write_fake_jpegs(out, images=40, width=48, height=40, classes=4)
    return out


def pack_of(src: Path, out: Path, shard_size: int = 4096) -> Path:
    """``dist-bot data pack`` of ``src`` in shards of ``shard_size`` bytes (tiny: a test's dataset spans several)."""
    import dist_bot.data.pack as pack

    minimum, pack.MIN_SHARD_SIZE = pack.MIN_SHARD_SIZE, 1
    try:
        pack.write_pack(src, out, shard_size=shard_size, workers=2)
    finally:
        pack.MIN_SHARD_SIZE = minimum
    return out


@pytest.fixture(scope="session")
def tiny_digits_pack(tmp_path_factory, tiny_digits) -> Path:
    """tiny_digits packed in shards of 4 kB (about 8 images each)."""
    return pack_of(tiny_digits, tmp_path_factory.mktemp("packs") / "tiny_digits")


@pytest.fixture(scope="session")
def imagenette_subset(tmp_path_factory) -> Path:
    """20 train and 10 val images per class of ../shared/data/imagenette."""
    if not (IMAGENETTE / "train").is_dir():
        pytest.skip(f"Imagenette not found at {IMAGENETTE} (CI has it; see ../shared/data/README.md)")
    return link_subset(IMAGENETTE, tmp_path_factory.mktemp("imagenette") / "subset", {"train": 20, "val": 10})


def torchrun_cmd(nproc: int, *args: str, script: str | None = None, restarts: int = 0) -> list[str]:
    """torchrun of `python -m dist_bot ARGS`, or of ``script`` ARGS, with ``restarts`` restarts of the group."""
    run = [script] if script else ["-m", "dist_bot"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={restarts}",
        *run,
        *args,
    ]


def runs_cmd(nproc: int, *runs: list[str], restarts: int = 0) -> list[str]:
    """torchrun of tests/probes/runs_probe.py: each of ``runs`` (a command's arguments) in turn, in one launch
    (one start-up for several cases, where the start-up is most of their cost)."""
    return torchrun_cmd(nproc, *map(json.dumps, runs), script=str(PROBES / "runs_probe.py"), restarts=restarts)


def run_statuses(stdout: str) -> dict[int, list[int]]:
    """{run index: each process's exit status} from runs_probe.py's output."""
    found: dict[int, list[int]] = {}
    for line in stdout.splitlines():
        if line.startswith("run ") and ": status " in line:
            i, status = line[4:].split(" in ")[0].split(": status ")
            found.setdefault(int(i), []).append(int(status))
    return found


def run_cmd(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env)


def startup_fields(text: str) -> dict[int, dict[str, str]]:
    """Each rank's start-up line (dist_bot.cli.set_up_process: host=... pid=... rank=R/W ...) in a launch's
    output, as {rank: {key: value}}."""
    found = {}
    for line in text.splitlines():
        if "start-up: " in line:
            fields = dict(kv.split("=", 1) for kv in line.split("start-up: ", 1)[1].split())
            found[int(fields["rank"].split("/")[0])] = fields
    return found


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended (a zombie has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
    except (OSError, IndexError):
        return False


def check_doctor_report(report: dict, world: int) -> None:
    """What every doctor.json holds, under torchrun or Slurm: each process's record with its all-reduce bus
    bandwidth and data rates."""
    procs = report["processes"]
    assert [p["rank"] for p in procs] == list(range(world))
    for p in procs:
        assert {"host", "device", "cpus", "torch", "dali", "step_img_per_s"} <= p.keys()
        assert p["decode_img_per_s"] > 0 and p["read_mb_s"] > 0
        if world > 1:
            assert all(v > 0 for scope in p["busbw_gb_s"].values() for v in scope.values()), p["busbw_gb_s"]
    assert {r["status"] for r in report["rows"]} <= {"ok", "info", "warn", "fail"}
