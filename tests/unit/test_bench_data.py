"""`dist-bot bench data`: loader variants side by side, with the training thread's time per batch."""

import pytest
import torch

from dist_bot.config import load_config


def test_bench_data_names_each_variant_and_times_the_training_thread(tiny_digits):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install -e '.[dali]')")
    from dist_bot.bench import bench_data

    cfg = load_config("configs/demo.yaml", [f"data.path={tiny_digits}", "data.batch_size=4"])
    variants = ["dali@data.dali_py_workers=0@data.workers=2", "torch@data.workers=0"]
    records = list(bench_data(cfg, variants, batches=2, repeats=1, warmup=1))
    assert [r["variant"] for r in records] == variants
    assert [r["loader"] for r in records] == ["dali", "torch"]
    assert (records[0]["workers"], records[0]["py_workers"], records[1]["workers"]) == (2, 0, 0)
    for r in records:
        assert r["img_per_s"] > 0 and r["main_thread_ms"] > 0 and len(r["runs"]) == 1
        assert r["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu") and r["device_name"]
        assert r["torch"] == torch.__version__ and r["dali"]
    assert records[1]["ratio_to_torch@data.workers=0"] == 1.0


def test_bench_data_puts_a_folder_and_its_pack_side_by_side_with_the_files_each_opens(tiny_digits, tiny_digits_pack):
    from dist_bot.bench import bench_data

    cfg = load_config("configs/demo.yaml", [f"data.path={tiny_digits}", "data.batch_size=4"])
    variants = ["torch@data.workers=0", f"torch@data.workers=0@data.path={tiny_digits_pack}"]
    folder, pack = bench_data(cfg, variants, batches=2, repeats=1, warmup=1)
    shards = len(list((tiny_digits_pack / "train").glob("shard-*.tar")))
    assert (folder["data"], folder["files"], folder["files_opened_per_epoch"]) == ("folder", 100, 100)
    assert (pack["data"], pack["files"], pack["files_opened_per_epoch"]) == ("pack", shards, shards)
    assert shards > 5 and pack["img_per_s"] > 0
