"""dist_bot's own GPU paths (marked `gpu`; skipped without CUDA): init_distributed with NCCL and the Trainer under
DDP on CUDA (torchrun, one process), fp16 through dist_bot's loss scaling with fused SGD, a checkpoint written
and loaded back, the step free of host-device synchronisation under CUDA's sync debug mode, and DALI's "mixed"
(nvJPEG) decoding. scripts/gpu_check.sh runs these on a GPU host."""

import json
import socket
import subprocess
import sys

import pytest
import torch
from conftest import run_cmd, torchrun_cmd

from dist_bot.checkpoint import list_checkpoints, load_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh on a GPU host)"),
]

SMALL = ["data.loader=synthetic", "model.num_classes=10", "data.image_size=64", "data.batch_size=64"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_and_resume(out, name: str, *args: str) -> tuple[subprocess.CompletedProcess, list[dict], list[dict]]:
    """demo.yaml on SMALL with ``args`` for 2 epochs under torchrun (one process): stopped for requeue after 4 steps,
    then resumed to its end. Returns the first launch and the run's train and val lines."""
    common = ["train", "configs/demo.yaml", *SMALL, *args, "schedule.epochs=2", "run.log_every_steps=4"]
    common += [f"run.out_dir={out}", f"run.name={name}"]
    first = run_cmd(torchrun_cmd(1, *common, "run.stop_after_steps=4"))
    assert "exiting with status 75" in first.stdout, first.stderr[-3000:]
    second = run_cmd(torchrun_cmd(1, *common))
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-3000:]
    lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    return first, [x for x in lines if x["split"] == "train"], [x for x in lines if x["split"] == "val"]


def test_torchrun_trains_with_nccl_ddp_fp16_and_resumes_from_its_checkpoint(tmp_path):
    common = ["train", "configs/demo.yaml", *SMALL, "precision=fp16", "schedule.epochs=1", "run.log_every_steps=4"]
    common += [f"run.out_dir={tmp_path}", "run.name=gpu"]
    first = run_cmd(torchrun_cmd(1, *common, "run.stop_after_steps=8"))
    assert "exiting with status 75" in first.stdout, first.stderr[-3000:]
    assert "ddp over nccl on cuda:0, fp16" in first.stderr  # init_distributed's NCCL group, the DDP strategy
    lines = [json.loads(x) for x in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [4, 8]
    assert all(x["max_gpu_mem_mb"] > 0 and x["loss_scale"] > 0 and x["data_s"] >= 0 for x in lines)
    ckpt = list_checkpoints(tmp_path / "gpu" / "checkpoints")[-1]
    saved = load_checkpoint(ckpt)
    assert saved["global_step"] == 8 and saved["guard"]["skipped_total"] >= 0

    # the checkpoint loads back into a Trainer on the GPU exactly (model, optimizer, scaler)
    from dist_bot.config import load_config
    from dist_bot.distributed.env import DistEnv
    from dist_bot.train import Trainer

    cfg = load_config("configs/demo.yaml", [*common[2:], "wandb.mode=disabled"])
    trainer = Trainer(cfg, DistEnv(device=torch.device("cuda", 0)))
    assert trainer.state.global_step == 8
    live = trainer.strategy.module.state_dict()
    assert all(torch.equal(live[k].cpu(), v) for k, v in saved["model"].items())
    assert trainer.strategy.loss_scale == torch.load(ckpt / "train_state.pt", weights_only=True)["scaler"]["scale"]
    trainer.tracker.close()

    second = run_cmd(torchrun_cmd(1, *common, "run.stop_after_steps=4"))
    assert "resumed from" in second.stderr and "exiting with status 75" in second.stdout, second.stderr[-3000:]
    assert load_checkpoint(list_checkpoints(tmp_path / "gpu" / "checkpoints")[-1])["global_step"] == 12


def test_fp16_loss_scaling_skips_an_overflow_with_fused_sgd_on_the_gpu():
    from dist_bot.config import load_config
    from dist_bot.distributed.ddp import DDPStrategy
    from dist_bot.distributed.env import DistEnv
    from dist_bot.recipe.sgd import make_sgd

    cfg = load_config(None, ["precision=fp16", "loss_scale.init_scale=1024"])
    dev = torch.device("cuda", 0)
    model = torch.nn.Linear(8, 4).to(dev)
    groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    strategy = DDPStrategy(model, lambda m: make_sgd(groups, 0.9, True), DistEnv(device=dev), cfg)
    assert strategy.optimizer.defaults["fused"], "fused SGD takes the scale and overflow flag on the device"
    strategy.set_lr(0.1)
    before = model.weight.detach().clone()
    strategy.backward(model(torch.randn(4, 8, device=dev)).sum() * float("inf"))
    taken = strategy.step()
    assert taken.device == dev and not taken.item()
    assert strategy.loss_scale == 512 and torch.equal(before, model.weight)
    strategy.backward(model(torch.randn(4, 8, device=dev)).sum())
    assert strategy.step().item() and not torch.equal(before, model.weight)


@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("configs/resnet50d_bs1024.yaml", []),
        # LARS's per-tensor norms and trust ratios stay on the device too (at 1,024: the same 8 micro-batches)
        ("configs/resnet50d_lars_bs8k.yaml", ["data.global_batch_size=1024"]),
    ],
    ids=["sgd-bs1024", "lars"],
)
def test_two_log_intervals_of_a_recipe_never_sync_outside_log_steps(tmp_path, monkeypatch, recipe, extra):
    """A recipe on one GPU (8 accumulated micro-batches of 128, fp16, label smoothing; mixup in bs1024) on
    synthetic data; from the first log step on, CUDA raises at any synchronising call except in log steps and
    the checkpoint (the first interval warms up: cuDNN's algorithm search, lazy initialisation)."""
    from dist_bot.config import load_config
    from dist_bot.distributed.env import DistEnv
    from dist_bot.train import Preempted, Trainer

    overrides = ["data.loader=synthetic", "run.log_every_steps=3", "run.stop_after_steps=6", "wandb.mode=disabled"]
    overrides += ["model.ema_decay=0.9998", *extra]  # the EMA's per-step update on the device, its skip flag too
    cfg = load_config(recipe, [*overrides, f"run.out_dir={tmp_path}"])
    logs = []
    real_log, real_save = Trainer.log_train, Trainer.save

    def log_train(self, interval):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real_log(self, interval)
        finally:
            logs.append(self.state.global_step)
            torch.cuda.set_sync_debug_mode("error")

    def save(self):
        torch.cuda.set_sync_debug_mode(0)
        real_save(self)

    monkeypatch.setattr(Trainer, "log_train", log_train)
    monkeypatch.setattr(Trainer, "save", save)
    trainer = Trainer(cfg, DistEnv(device=torch.device("cuda", 0)))
    assert trainer.cfg.optim.grad_accum_steps == 8 and trainer.cfg.data.batch_size == 128
    try:
        with pytest.raises(Preempted):
            trainer.fit()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert logs == [3, 6]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_training_run_on_the_gpu(tmp_path, precision):
    out = run_cmd(
        [
            sys.executable,
            "-m",
            "dist_bot",
            "train",
            "configs/demo.yaml",
            *SMALL,
            f"precision={precision}",
            "schedule.epochs=1",
            "run.log_every_steps=16",
            f"run.out_dir={tmp_path}",
            "run.name=gpu",
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert train and all(x["max_gpu_mem_mb"] > 0 for x in train)
    assert [x["samples"] for x in lines if x["split"] == "val"] == [64]
    if precision == "fp16":
        assert all(x["loss_scale"] > 0 for x in train)


def test_lars_with_an_ema_in_bf16_trains_and_resumes_on_the_gpu(tmp_path):
    """LARS (its foreach norms and trust ratios on CUDA tensors) with the EMA in bf16: a run stopped for requeue
    resumes from its checkpoint (model, optimizer, EMA) and finishes with EMA metrics. (FSDP2 and ZeRO need two
    GPUs: NCCL takes one process per GPU; their LARS and EMA are checked against DDP on CPU.)"""
    first, train, val = stop_and_resume(tmp_path, "lars", "precision=bf16", "optim.name=lars", "model.ema_decay=0.99")
    assert "ddp over nccl on cuda:0, bf16" in first.stderr
    assert train and all(x["max_gpu_mem_mb"] > 0 and x["loss"] == x["loss"] for x in train)
    assert val and all("ema_top1" in x and x["samples"] == 64 for x in val)


def test_a_run_compiled_with_cuda_graphs_evaluates_checkpoints_and_resumes(tmp_path):
    """model.compile_mode=reduce-overhead (inductor's CUDA graphs of the forward and backward, the sweep's
    candidate for the fastest step) through a whole run under torchrun: the step's outputs read before the next
    replay overwrites them, evaluation (the model and its EMA, no grad) between training steps, a checkpoint, and
    a resume that compiles again."""
    graphs = ["precision=bf16", "model.compile=true", "model.compile_mode=reduce-overhead", "model.ema_decay=0.99"]
    _, train, val = stop_and_resume(tmp_path, "graphs", *graphs)
    assert train and all(x["loss"] == x["loss"] and 0 < x["loss"] < 10 for x in train)  # finite, not garbage
    assert [x["samples"] for x in val] == [64, 64] and all("ema_top1" in x for x in val)


@pytest.mark.parametrize("layout", ["folder", "pack"])
def test_dali_mixed_decoding_on_the_gpu(fake_jpegs, tmp_path, layout):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed here (its wheel did not travel)")
    from conftest import pack_of

    from dist_bot.config import load_config
    from dist_bot.data import make_loaders
    from dist_bot.distributed.env import DistEnv

    data = fake_jpegs if layout == "folder" else pack_of(fake_jpegs, tmp_path / "pack")  # packs: read by index
    cfg = load_config(
        "configs/demo.yaml", [f"data.path={data}", "data.loader=dali", "data.batch_size=8", "precision=fp16"]
    )
    env = DistEnv(device=torch.device("cuda", 0))
    train, val = make_loaders(cfg, env)
    train.set_epoch(0)
    images, labels = next(iter(train))
    assert images.device.type == "cuda" and labels.device.type == "cuda"
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float16
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert sum(len(labels) for _, labels in val) == val.samples
    assert all(labels.device.type == "cuda" for _, labels in val)


def test_sync_bn_with_nccl_in_one_process():
    """model.sync_bn: SyncBatchNorm needs CUDA and a process group."""
    import torch.distributed as dist

    from dist_bot.models import build_model

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        dev = torch.device("cuda", 0)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model("resnet18d", num_classes=10)).to(dev)
        ddp = torch.nn.parallel.DistributedDataParallel(model.to(memory_format=torch.channels_last), device_ids=[0])
        x = torch.randn(16, 3, 64, 64, device=dev).to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = ddp(x).float().logsumexp(1).mean()
        loss.backward()
        assert torch.isfinite(loss) and model.fc.weight.grad is not None
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "strategy",
    [["strategy=fsdp"], pytest.param(["strategy=deepspeed", "dist.zero_stage=1"], id="zero1")],
    ids=["fsdp", "zero1"],
)
def test_sharded_strategies_train_fp16_and_round_trip_a_checkpoint_at_world_size_one(tmp_path, strategy):
    """FSDP2 and DeepSpeed ZeRO-1 on CUDA (torchrun, one process, NCCL), fp16 with dynamic loss scaling: a run
    stopped for requeue resumes from its checkpoint and finishes, with loss scales logged throughout."""
    if "strategy=deepspeed" in strategy:
        pytest.importorskip("deepspeed", reason="ZeRO needs DeepSpeed (pip install -e '.[deepspeed]')")
    _, train, val = stop_and_resume(tmp_path, "sharded", "precision=fp16", *strategy)
    assert train and all(x["loss_scale"] > 0 and x["loss"] == x["loss"] for x in train)
    assert [x["samples"] for x in val] == [64, 64]


def test_a_checkpoint_whose_rng_state_came_from_more_gpus_resumes_here(tmp_path):
    """A checkpoint written where rank 0 saw 8 GPUs (the older layout: its get_rng_state_all() under "cuda"),
    resumed where this process sees fewer: it restores its own GPU's state and trains on."""
    from dist_bot.checkpoint import read_meta, write_file

    common = ["train", "configs/demo.yaml", *SMALL, "schedule.epochs=2", "run.log_every_steps=4"]
    common += [f"run.out_dir={tmp_path}", "run.name=rng"]
    first = run_cmd(torchrun_cmd(1, *common, "run.stop_after_steps=4"))
    assert "exiting with status 75" in first.stdout, first.stderr[-3000:]
    ckpt = list_checkpoints(tmp_path / "rng" / "checkpoints")[-1]
    meta = read_meta(ckpt)
    own = torch.cuda.get_rng_state(0)
    meta["rng"] = {k: v for k, v in meta["rng"].items() if k != "cuda_by_rank"} | {"cuda": [own] * 8}
    write_file(meta, ckpt / "meta.pt")
    second = run_cmd(torchrun_cmd(1, *common))
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-3000:]
