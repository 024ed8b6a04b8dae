"""dist_bot.data.check on a small dataset written here, with every kind of problem planted in it."""

import json
import random
import shutil

import pytest
from PIL import Image

from dist_bot.data.check import check_dataset
from dist_bot.errors import DataError

_rng = random.Random(0)


def image(path, mode="RGB", fmt="JPEG"):
    """A small noise image, so no two files are identical by accident (solid colors can encode alike)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes(mode, (8, 8), _rng.randbytes(64 * Image.getmodebands(mode))).save(path, fmt)
    return path


def clean_dataset(root):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                image(root / split / cls / f"{i}.jpg")
    return root


@pytest.fixture
def bad(tmp_path):
    """A dataset with one of each problem; returns (root, the planted paths)."""
    root = clean_dataset(tmp_path / "bad")
    t, v = root / "train", root / "val"
    image(t / "cat" / "gray.jpg", "L")
    image(t / "cat" / "cmyk.jpg", "CMYK")
    image(t / "dog" / "pic.png", fmt="PNG")
    (t / "cat" / "truncated.jpg").write_bytes((t / "cat" / "0.jpg").read_bytes()[:50])
    (t / "cat" / "fake.jpg").write_text("not an image\n")
    (t / "cat" / "notes.txt").write_text("labels checked by hand\n")
    (t / "empty").mkdir()
    image(t / "onlytrain" / "0.jpg")
    image(v / "onlyval" / "0.jpg")
    shutil.copy(t / "dog" / "1.jpg", v / "cat" / "leak.jpg")
    return root


def test_every_problem_is_reported(bad):
    r = check_dataset(bad, workers=4)
    t, v = bad / "train", bad / "val"
    assert [p for p, _ in r.unreadable] == [str(t / "cat" / "fake.jpg"), str(t / "cat" / "truncated.jpg")]
    assert all(err for _, err in r.unreadable)
    assert r.non_image == [str(t / "cat" / "notes.txt")]
    assert r.empty_classes == [("train", "empty")]
    assert r.missing_in_val == ["empty", "onlytrain"]
    assert r.extra_in_val == ["onlyval"]
    assert r.duplicates == [(str(t / "dog" / "1.jpg"), str(v / "cat" / "leak.jpg"))]
    assert not r.ok


def test_grayscale_cmyk_and_png_count_as_readable(bad):
    r = check_dataset(bad)
    assert r.counts == {
        "train": {"cat": 3 + 2, "dog": 3 + 1, "empty": 0, "onlytrain": 1},  # + gray, cmyk / + png
        "val": {"cat": 2 + 1, "dog": 2, "onlyval": 1},  # + the leaked copy, which does decode
    }


def test_reports_are_serialisable_and_name_each_problem(bad):
    r = check_dataset(bad)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["ok"] is False
    assert len(d["unreadable"]) == 2
    text = r.to_text()
    for needle in ("fake.jpg", "truncated.jpg", "notes.txt", "train/empty", "onlytrain", "onlyval", "leak.jpg"):
        assert needle in text
    assert "PROBLEMS FOUND" in text
    assert "train: 10 readable images in 4 classes" in text


def test_clean_dataset_is_ok_and_warnings_do_not_fail_it(tmp_path):
    root = clean_dataset(tmp_path / "clean")
    r = check_dataset(str(root), workers=1)
    assert r.ok
    assert r.counts == {"train": {"cat": 3, "dog": 3}, "val": {"cat": 2, "dog": 2}}
    assert r.to_text().endswith("OK")

    for i in range(25):  # warnings only, and more than to_text() lists
        (root / "train" / "cat" / f"notes{i:02}.txt").write_text("x")
    r = check_dataset(root)
    assert r.ok
    assert len(r.non_image) == 25
    assert "... and 5 more" in r.to_text()


@pytest.mark.parametrize("remove", ["root", "train", "val"])
def test_missing_folders_raise_a_clear_error(tmp_path, remove):
    root = clean_dataset(tmp_path / "ds")
    if remove == "root":
        shutil.rmtree(root)
    else:
        shutil.rmtree(root / remove)
    with pytest.raises(DataError, match="ImageNet layout") as e:
        check_dataset(root)
    assert str(root) in str(e.value)
    if remove != "root":
        assert f"'{remove}/'" in str(e.value)
