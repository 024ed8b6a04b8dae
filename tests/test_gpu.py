"""GPU paths (marked `gpu`; skipped without CUDA): NCCL DDP in one process, fp16 with a CUDA GradScaler,
channels_last, SyncBatchNorm, the engine end to end on the GPU, and DALI's "mixed" (nvJPEG) decoding.
scripts/gpu_check.sh runs these on a lent GPU machine."""

import json
import socket
import sys

import pytest
import torch
from conftest import run_cmd

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh on a GPU host)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_ddp_fp16_grad_scaler_channels_last_and_sync_bn_in_one_process():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dist_bot.config import LossScaleConfig
    from dist_bot.models import build_model
    from dist_bot.recipe.precision import make_grad_scaler

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        dev = torch.device("cuda", 0)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model("resnet18d", num_classes=10))
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        model = model.to(dev, memory_format=torch.channels_last)
        ddp = DistributedDataParallel(model, device_ids=[0])
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        scaler = make_grad_scaler("fp16", dev, LossScaleConfig())
        x = torch.randn(16, 3, 64, 64, device=dev).to(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (16,), device=dev)
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(ddp(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        assert torch.isfinite(loss) and scaler.get_scale() > 0
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        assert model.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        t = torch.ones(4, device=dev)
        dist.all_reduce(t)
        assert t.tolist() == [1.0] * 4
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_training_run_on_the_gpu(tmp_path, precision):
    out = run_cmd(
        [
            sys.executable,
            "-m",
            "dist_bot",
            "train",
            "configs/demo.yaml",
            "data.loader=synthetic",
            "model.num_classes=10",
            "data.image_size=64",
            "data.batch_size=64",
            f"precision={precision}",
            "schedule.epochs=1",
            "run.log_every_steps=4",
            f"run.out_dir={tmp_path}",
            "run.name=gpu",
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert train and all(x["max_gpu_mem_mb"] > 0 for x in train)
    if precision == "fp16":
        assert all(x["loss_scale"] > 0 for x in train)


def test_dali_mixed_decoding_on_the_gpu(tiny_digits):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed here (its wheel did not travel)")
    from dist_bot.config import load_config
    from dist_bot.data import make_loaders
    from dist_bot.distributed.env import DistEnv

    cfg = load_config(
        "configs/demo.yaml", [f"data.path={tiny_digits}", "data.loader=dali", "data.batch_size=8", "precision=fp16"]
    )
    env = DistEnv(device=torch.device("cuda", 0))
    train, val = make_loaders(cfg, env)
    train.set_epoch(0)
    images, labels = next(iter(train))
    assert images.device.type == "cuda" and labels.device.type == "cuda"
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float16
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert sum(len(labels) for _, labels in val) == val.samples
