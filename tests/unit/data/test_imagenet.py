"""`dist-bot data imagenet`: a pack straight from ImageNet's official archives (small ones made in their formats):
the classes are the sorted WNIDs, val labels come from the ground truth through the devkit's IDs, the samples are
those of `data pack` of the extracted archives, counts are checked against the devkit, and nothing is half-written."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dist_bot.data.pack as pack
from dist_bot.cli import main
from dist_bot.data.imagenet import read_devkit, write_imagenet_pack
from dist_bot.data.source import open_pack
from dist_bot.datasets import write_ilsvrc_archives
from dist_bot.errors import DataError

pytest.importorskip("scipy", reason="the devkit's meta.mat needs scipy (pip install -e '.[imagenet]')")

WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684"]
WORDS = {"n01440764": "tench, Tinca tinca", "n02102040": "English springer, English springer spaniel"}


@pytest.fixture(scope="module")
def folder(fake_jpegs, tmp_path_factory) -> Path:
    """fake_jpegs with WNIDs for class names, and two of ImageNet's odd files in train: a CMYK JPEG and a PNG
    named .JPEG."""
    out = tmp_path_factory.mktemp("wnid") / "data"
    for split in ("train", "val"):
        for i, wnid in enumerate(WNIDS):
            shutil.copytree(fake_jpegs / split / f"class{i:03d}", out / split / wnid)
    Image.new("CMYK", (40, 30), (10, 200, 30, 0)).save(out / "train" / WNIDS[0] / "n01440764_cmyk.JPEG")
    Image.new("RGB", (40, 30), (200, 10, 30)).save(out / "train" / WNIDS[1] / "n02102040_png.JPEG", format="PNG")
    return out


@pytest.fixture(scope="module")
def archives(folder, tmp_path_factory) -> dict:
    return write_ilsvrc_archives(folder, tmp_path_factory.mktemp("ilsvrc") / "archives", WORDS)


def args_of(archives: dict) -> list[str]:
    return [archives["train_tar"], archives["val_tar"], archives["devkit"]]


def extract_as_folders(archives: dict, out: Path) -> Path:
    """The archives extracted as ImageNet users do: train/<wnid>/ from the synset tars, val/<wnid>/ by the ground
    truth (valprep.sh)."""
    kit = read_devkit(archives["devkit"])
    with tarfile.open(archives["train_tar"]) as outer:
        for m in outer.getmembers():
            with tarfile.open(fileobj=outer.extractfile(m)) as inner:
                inner.extractall(out / "train" / m.name.removesuffix(".tar"), filter="data")
    with tarfile.open(archives["val_tar"]) as tar:
        for m in tar.getmembers():
            k = int(m.name.removesuffix(".JPEG").rsplit("_", 1)[1])
            (out / "val" / kit.val_wnids[k - 1]).mkdir(parents=True, exist_ok=True)
            (out / "val" / kit.val_wnids[k - 1] / m.name).write_bytes(tar.extractfile(m).read())
    return out


def test_the_pack_of_the_archives_is_the_pack_of_their_extracted_folders(archives, folder, tmp_path, capsys):
    assert main(["data", "imagenet", *args_of(archives), str(tmp_path / "pack"), "--workers", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == {"train": 38, "val": 4} and summary["bad_files"] == 0
    assert summary["images_per_s"] > 0 and summary["mb_per_s"] > 0
    extracted = extract_as_folders(archives, tmp_path / "extracted")
    pack.write_pack(extracted, tmp_path / "folder_pack", workers=2)
    manifest = json.loads((tmp_path / "pack" / "pack.json").read_text())
    assert manifest["classes"] == WNIDS  # sorted WNIDs: torchvision's and timm's label order
    assert manifest["class_descriptions"] == {w: WORDS.get(w, w) for w in WNIDS}
    for split in ("train", "val"):
        for name in ("index.npy", "names.txt"):  # the same samples, in the same order, in the same shards
            got, want = (p / split / name for p in (tmp_path / "pack", tmp_path / "folder_pack"))
            assert got.read_bytes() == want.read_bytes(), (split, name)
    train, val = open_pack(tmp_path / "pack")
    assert train.samples[0][0] == f"{archives['train_tar']}/{WNIDS[0]}/00001.jpg"  # errors name the member
    for images, split in ((train, "train"), (val, "val")):  # each image under its class, byte for byte
        originals = {w: {f.read_bytes() for f in (folder / split / w).iterdir()} for w in WNIDS}
        assert all(images.read(i) in originals[WNIDS[label]] for i, (_, label) in enumerate(images.samples))
    odd = [i for i, (path, _) in enumerate(train.samples) if path.endswith(("_cmyk.JPEG", "_png.JPEG"))]
    assert [Image.open(io.BytesIO(train.read(i))).format for i in odd] == ["JPEG", "PNG"]  # packed as they are


def test_val_labels_follow_the_ground_truth_through_the_devkits_ids(archives):
    kit = read_devkit(archives["devkit"])
    assert kit.wnids == tuple(WNIDS) and kit.words["n01440764"] == "tench, Tinca tinca"  # parents are no class
    with tarfile.open(archives["devkit"]) as tar:
        truth = tar.extractfile("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").read().split()
    ids = [int(t) for t in truth]
    assert [WNIDS.index(w) + 1 for w in kit.val_wnids] != ids  # the IDs are not the WNIDs' order ...
    by_id = dict(zip(ids, kit.val_wnids, strict=True))
    assert len(set(by_id.values())) == len(by_id)  # ... and each ID is one class


def rewrite(src: str, dst: Path, keep) -> str:
    """A copy of tar ``src`` with the members ``keep(member)`` accepts."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            if keep(m):
                tout.addfile(m, tin.extractfile(m))
    return str(dst)


def meta_with(archives: dict, dst: Path, **changes) -> str:
    """A copy of the devkit whose meta.mat field names are renamed by ``changes`` (old=new)."""
    import scipy.io

    with tarfile.open(archives["devkit"]) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    meta_name = next(n for n in files if n.endswith("meta.mat"))
    synsets = scipy.io.loadmat(io.BytesIO(files[meta_name]), squeeze_me=True)["synsets"]
    renamed = np.zeros(len(synsets), dtype=[(changes.get(f, f), "O") for f in synsets.dtype.names])
    for f in synsets.dtype.names:
        renamed[changes.get(f, f)] = synsets[f]
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": renamed})
    files[meta_name] = buf.getvalue()
    with tarfile.open(dst, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(dst)


@pytest.mark.parametrize(
    "case",
    ["swapped", "another year", "no ground truth", "a class short", "a val image missing", "not a tar"],
)
def test_archives_that_are_not_ilsvrc2012s_are_named_and_nothing_is_written(archives, tmp_path, case):
    train, val, devkit = args_of(archives)
    if case == "swapped":
        train, val, want = val, train, r"holds ILSVRC2012_val_00000001\.JPEG, where .* one tar per synset"
    elif case == "another year":
        devkit = meta_with(archives, tmp_path / "kit.tar.gz", ILSVRC2012_ID="ILSVRC2010_ID")
        want = r"no ILSVRC2012_ID \(ILSVRC2010_ID instead\): a devkit of another year"
    elif case == "no ground truth":
        devkit = rewrite(devkit, tmp_path / "kit.tar", lambda m: "ground_truth" not in m.name)
        want = r"has no data/ILSVRC2012_validation_ground_truth\.txt: it is not ILSVRC2012's devkit"
    elif case == "a class short":
        with tarfile.open(train) as tin, tarfile.open(tmp_path / "train.tar", "w") as tout:
            for m in tin.getmembers():
                data = tin.extractfile(m).read()
                if m.name == f"{WNIDS[2]}.tar":  # drop one image of this synset's tar
                    inner_out = io.BytesIO()
                    with tarfile.open(fileobj=io.BytesIO(data)) as i_in, tarfile.open(fileobj=inner_out, mode="w") as o:
                        for im in i_in.getmembers()[1:]:
                            o.addfile(im, i_in.extractfile(im))
                    data = inner_out.getvalue()
                    m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
        train, want = str(tmp_path / "train.tar"), rf"{WNIDS[2]}: 8 images, the devkit says 9.*download it again"
    elif case == "a val image missing":
        val = rewrite(val, tmp_path / "val.tar", lambda m: not m.name.endswith("00000003.JPEG"))
        want = r"has 3 val images, the devkit's ground truth labels 4 \(missing ILSVRC2012_val_00000003\.JPEG\)"
    else:
        (tmp_path / "train.tar").write_bytes(b"not an archive" * 100)
        train, want = str(tmp_path / "train.tar"), r"cannot read .*train\.tar as a tar archive"
    with pytest.raises(DataError, match=want):
        write_imagenet_pack(train, val, devkit, tmp_path / "pack", workers=2)
    assert not (tmp_path / "pack").exists()


def test_an_interrupted_conversion_resumes_keeping_its_shards(archives, tmp_path, monkeypatch):
    real, closed = pack.SplitPacker.close_shard, []

    def close_then_die(self, tmp, rec):
        if len(closed) == 2:
            raise KeyboardInterrupt
        closed.append(tmp)
        real(self, tmp, rec)

    minimum, pack.MIN_SHARD_SIZE = pack.MIN_SHARD_SIZE, 1
    try:
        monkeypatch.setattr(pack.SplitPacker, "close_shard", close_then_die)
        with pytest.raises(KeyboardInterrupt):
            write_imagenet_pack(*args_of(archives), tmp_path / "pack", shard_size=8192, workers=2)
        with pytest.raises(DataError, match="unfinished pack"):
            open_pack(tmp_path / "pack")
        monkeypatch.setattr(pack.SplitPacker, "close_shard", real)
        summary = write_imagenet_pack(*args_of(archives), tmp_path / "pack", shard_size=8192, workers=2)
        whole = write_imagenet_pack(*args_of(archives), tmp_path / "whole", shard_size=8192, workers=2)
    finally:
        pack.MIN_SHARD_SIZE = minimum
    assert summary.resumed_shards == 2 and summary.written < whole.written
    for split in ("train", "val"):
        names = sorted(p.name for p in (tmp_path / "whole" / split).iterdir())
        assert sorted(p.name for p in (tmp_path / "pack" / split).iterdir()) == names
        for name in names:
            assert (tmp_path / "pack" / split / name).read_bytes() == (tmp_path / "whole" / split / name).read_bytes()


@pytest.mark.slow  # a short run
def test_the_devkits_words_travel_with_checkpoints_exports_and_predictions(archives, folder, tmp_path, capsys):
    from safetensors import safe_open

    write_imagenet_pack(*args_of(archives), tmp_path / "pack", workers=2)
    args = [f"data.path={tmp_path / 'pack'}", "data.loader=torch", "data.workers=0", "data.image_size=16"]
    args += ["model.name=resnet18d", "precision=fp32", "schedule.epochs=1", f"run.out_dir={tmp_path}"]
    assert main(["train", "configs/demo.yaml", *args, "run.name=r"]) == 0
    exported = tmp_path / "r.safetensors"
    assert main(["export", str(tmp_path / "r"), "--format", "timm", "--out", str(exported)]) == 0
    with safe_open(str(exported), "pt") as f:
        cfg = json.loads(f.metadata()["pretrained_cfg"])
    descriptions = {w: WORDS.get(w, w) for w in WNIDS}
    assert cfg["label_names"] == WNIDS and cfg["label_descriptions"] == descriptions  # as timm's ImageNetInfo has
    image = str(next((folder / "val" / WNIDS[0]).iterdir()))
    capsys.readouterr()
    for source in (tmp_path / "r", exported):
        assert main(["predict", str(source), image, "--topk", "4", "--json"]) == 0
        top = json.loads(capsys.readouterr().out)["top"]
        assert [t["description"] for t in top] == [descriptions[t["class"]] for t in top]
