"""Packs (`dist-bot data pack`): a folder dataset as WebDataset-layout tar shards plus an index; read by index, they
give the loaders exactly the folder's samples; an unfinished pack is never taken for a whole one."""

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import pack_of

import dist_bot.data.pack as pack
from dist_bot.config import load_config
from dist_bot.data import make_loaders
from dist_bot.data.check import check_dataset
from dist_bot.data.source import open_dataset, open_pack, scan_dataset
from dist_bot.distributed.env import DistEnv
from dist_bot.errors import DataError


def copy_dataset(src: Path, out: Path) -> Path:
    shutil.copytree(src, out, symlinks=False)  # real files: tests change them
    return out


def tar_samples(shard: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of a shard, read with the standard tarfile module, WebDataset's way."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_shards_are_webdataset_tars_and_the_index_reads_each_folder_sample(tiny_digits, tiny_digits_pack):
    folder_train, folder_val = scan_dataset(str(tiny_digits))
    train, val = open_pack(tiny_digits_pack)
    for split, images, folder in (("train", train, folder_train), ("val", val, folder_val)):
        assert images.classes == folder.classes and images.samples == folder.samples  # index i is the folder's i
        shards = sorted((tiny_digits_pack / split).glob("shard-*.tar"))
        assert len(shards) > 1 or split == "val"
        members = {}
        for shard in shards:
            members |= tar_samples(shard)
        assert sorted(members) == [f"{i:08d}" for i in range(len(folder))]  # keys: the sample index
        for i, (path, label) in enumerate(folder.samples):
            sample = members[f"{i:08d}"]
            assert set(sample) == {"jpg", "cls"} and sample["cls"] == str(label).encode()
            assert sample["jpg"] == Path(path).read_bytes() == images.read(i)
    assert train.reader.opened <= len(list((tiny_digits_pack / "train").glob("shard-*.tar")))


def test_the_webdataset_library_reads_a_pack(tiny_digits, tiny_digits_pack):
    wds = pytest.importorskip("webdataset", reason="webdataset is not installed (optional)")
    folder_train, _ = scan_dataset(str(tiny_digits))
    urls = [str(p) for p in sorted((tiny_digits_pack / "train").glob("shard-*.tar"))]
    labels = [int(s["cls"]) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert labels == [label for _, label in folder_train.samples]


def test_a_bad_image_is_reported_and_not_packed(tmp_path, fake_jpegs):
    src = copy_dataset(fake_jpegs, tmp_path / "src")
    bad = src / "train" / "class001" / "00000-truncated.jpg"
    bad.write_bytes((src / "train" / "class001").glob("*.jpg").__next__().read_bytes()[:200])
    summary = pack.write_pack(src, tmp_path / "pack", workers=2)
    assert [p for p, _ in summary.bad] == [str(bad)]
    manifest = json.loads((tmp_path / "pack" / "pack.json").read_text())
    assert [p for p, _ in manifest["bad_files"]] == [str(bad)]
    train, _ = open_pack(tmp_path / "pack")
    folder_train, _ = scan_dataset(str(src))
    assert train.samples == tuple(s for s in folder_train.samples if s[0] != str(bad))
    assert summary.samples["train"] == len(folder_train) - 1


def test_an_interrupted_pack_is_no_pack_and_a_rerun_finishes_it_keeping_its_shards(
    tmp_path, tiny_digits, tiny_digits_pack, monkeypatch
):
    real, closed = pack.SplitPacker.close_shard, []

    def close_then_die(self, tmp, rec):
        if len(closed) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C or a killed job would, mid-shard
        closed.append(tmp)
        real(self, tmp, rec)

    monkeypatch.setattr(pack.SplitPacker, "close_shard", close_then_die)
    dst = tmp_path / "pack"
    with pytest.raises(KeyboardInterrupt):
        pack_of(tiny_digits, dst)
    for opener in (open_pack, open_dataset, check_dataset):
        with pytest.raises(DataError, match=r"unfinished pack.*rerun `dist-bot data pack"):
            opener(str(dst))
    with pytest.raises(DataError, match="unfinished pack"):
        make_loaders(load_config(None, [f"data.path={dst}", "data.loader=torch"]), DistEnv())

    monkeypatch.setattr(pack.SplitPacker, "close_shard", real)
    with pytest.raises(DataError, match=r"unfinished pack of .* --shard-size 4096: rerun with those arguments"):
        pack.write_pack(tiny_digits, dst, shard_size=10**6)
    kept = {p.name: p.stat().st_mtime_ns for p in (dst / "train").glob("shard-*.tar")}
    assert len(kept) == 3
    minimum, pack.MIN_SHARD_SIZE = pack.MIN_SHARD_SIZE, 1
    try:
        summary = pack.write_pack(tiny_digits, dst, shard_size=4096, workers=2)
    finally:
        pack.MIN_SHARD_SIZE = minimum
    assert summary.resumed_shards == 3
    assert all((dst / "train" / n).stat().st_mtime_ns == t for n, t in kept.items())  # not rewritten
    assert not (dst / pack.PROGRESS).exists()
    for split in ("train", "val"):  # the same pack as one written in one go
        whole = sorted(p.name for p in (tiny_digits_pack / split).iterdir())
        assert sorted(p.name for p in (dst / split).iterdir()) == whole
        for name in whole:
            assert (dst / split / name).read_bytes() == (tiny_digits_pack / split / name).read_bytes(), name


def test_packing_refuses_a_finished_pack_and_a_folder_that_is_not_a_pack(tmp_path, tiny_digits, tiny_digits_pack):
    with pytest.raises(DataError, match="already a finished pack"):
        pack.write_pack(tiny_digits, tiny_digits_pack)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        pack.write_pack(tiny_digits, tmp_path / "other")
    with pytest.raises(DataError, match="too small"):
        pack.write_pack(tiny_digits, tmp_path / "new", shard_size=1000)


def test_data_check_of_a_pack_finds_index_and_image_damage(tmp_path, tiny_digits, tiny_digits_pack):
    report = check_dataset(tiny_digits_pack, workers=2)
    assert report.ok, report.to_text()
    assert report.counts == check_dataset(tiny_digits, workers=2).counts

    damaged = Path(shutil.copytree(tiny_digits_pack, tmp_path / "damaged"))
    index_file = damaged / "train" / "index.npy"
    index = np.load(index_file)
    index["offset"][5] += 512  # the index no longer points at sample 5's member
    np.save(index_file, index)
    train, _ = open_pack(damaged)
    shard = damaged / "train" / train.reader.shard_names[int(index["shard"][20])]
    with open(shard, "r+b") as f:  # sample 20's bytes overwritten inside its shard
        f.seek(int(index["offset"][20]) + 100)
        f.write(b"\0" * 200)
    report = check_dataset(damaged, workers=2)
    assert not report.ok
    problems = "\n".join(f"{where}: {why}" for where, why in report.unreadable)
    assert "sample 5: no member at offset" in problems
    assert train.samples[20][0] in problems  # an image that no longer decodes is named by its source file


def test_shard_sizes_parse_with_units():
    from dist_bot.cli import parse_size

    assert parse_size("1GB") == 10**9 and parse_size("256MiB") == 256 * 2**20 and parse_size("4096") == 4096
    for bad in ("", "GB", "1XB", "one"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_a_shuffled_epoch_opens_each_shard_once_per_reader_when_all_stay_open():
    from dist_bot.data.source import opens_per_epoch

    shard_of = np.repeat(np.arange(10), 100)  # 10 shards of 100 samples
    order = np.random.default_rng(0).permutation(1000)
    batches = [order[i : i + 50].tolist() for i in range(0, 1000, 50)]
    assert opens_per_epoch(shard_of, batches, readers=1, keep=10) == 10
    assert opens_per_epoch(shard_of, batches, readers=4, keep=10) == 40
    assert opens_per_epoch(shard_of, batches, readers=1, keep=2) > 500  # a few open files: an open per image
    sequential = [list(range(i, i + 50)) for i in range(0, 1000, 50)]
    assert opens_per_epoch(shard_of, sequential, readers=1, keep=1) == 10


def test_the_data_pack_command_lists_bad_files_prints_a_summary_and_refuses_to_overwrite(tmp_path, fake_jpegs, capsys):
    from dist_bot.cli import main

    src = copy_dataset(fake_jpegs, tmp_path / "src")
    (src / "val" / "class002" / "empty.jpg").write_bytes(b"")
    dst = tmp_path / "pack"
    assert main(["data", "pack", str(src), str(dst), "--shard-size", "1MB", "--workers", "2"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["samples"] == {"train": 36, "val": 4} and summary["bad_files"] == 1
    assert f"not packed: {src / 'val' / 'class002' / 'empty.jpg'}" in err
    assert main(["data", "check", str(dst)]) == 0 and capsys.readouterr().out.rstrip().endswith("OK")
    assert main(["data", "pack", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dist-bot data: error: ") and "already a finished pack" in err and err.count("\n") == 1
