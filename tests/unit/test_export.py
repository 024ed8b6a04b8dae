"""Export, predict and eval of run and checkpoint folders: each export loads in its own tool with the checkpoint's
logits and class names; predict and eval find the checkpoint a run folder means."""

import json
import logging
import shutil

import pytest
import torch
from torch import nn

from dist_bot.checkpoint import (
    FORMAT_VERSION,
    list_checkpoints,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
    write_file,
)
from dist_bot.cli import main
from dist_bot.config import Config, to_dict
from dist_bot.errors import CheckpointError, ExportError
from dist_bot.export import ONNX_LOGGERS, export_checkpoint
from dist_bot.models import build_model
from dist_bot.predict import load_predictor, predict_files

CLASSES = ["cat", "dog", "eel"]
TINY = ["model.name=resnet18d", "data.workers=0", "data.batch_size=8", "wandb.mode=disabled", "precision=fp32"]


def random_model(name: str, seed: int = 0) -> nn.Module:
    """Random weights AND random BN statistics, so that every layer and every key's mapping shows in the logits."""
    torch.manual_seed(seed)
    model = build_model(name, len(CLASSES), zero_init_last=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def write_checkpoint(folder, name: str, ema: nn.Module | None = None, class_names=CLASSES, step: int = 7):
    """A checkpoint folder as the Trainer writes it (meta.pt, model.pt, and ema.pt when given), 64 px."""
    cfg = Config()
    cfg.model.name, cfg.data.image_size = name, 64

    def write(tmp):
        meta = {"format": FORMAT_VERSION, "global_step": step, "config": to_dict(cfg), "model_name": name}
        meta |= {"num_classes": len(CLASSES)} | ({"class_names": class_names} if class_names else {})
        write_file(meta, tmp / "meta.pt")
        write_file(random_model(name).state_dict(), tmp / "model.pt")
        if ema is not None:
            write_file(ema.state_dict(), tmp / "ema.pt")

    return save_checkpoint(folder, step, keep_last=5, write=write)


def batch(size: int = 2, px: int = 64) -> torch.Tensor:
    return torch.randn(size, 3, px, px, generator=torch.Generator().manual_seed(size))


# -- the checkpoint a path means ------------------------------------------------------------------


def test_a_run_folder_means_its_newest_checkpoint_that_reads_whole(tmp_path, caplog):
    run = tmp_path / "run"
    older, newest = (write_checkpoint(run / "checkpoints", "resnet18d", step=s) for s in (3, 9))
    assert resolve_checkpoint(run) == newest and resolve_checkpoint(older) == older
    with open(newest / "model.pt", "r+b") as f:  # cut short, as by a crash or a full disk
        f.truncate(1000)
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(run) == older
    assert "model.pt is unreadable" in caplog.text


@pytest.mark.parametrize("kind", ["missing", "other folder", "empty run"])
def test_a_path_that_is_no_checkpoint_names_what_is_expected(tmp_path, kind):
    path = tmp_path / "x"
    if kind != "missing":
        path.mkdir()
    if kind == "empty run":
        (path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(path)
    expected = {"missing": "does not exist", "other folder": "is neither a run folder", "empty run": "no readable"}
    assert expected[kind] in str(e.value) and ("checkpoint folder" in str(e.value))


# -- export: each format in its own tool ----------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs"), [("resnet18d", "resnet18d"), ("resnet18a", "resnet18"), ("resnet50c", "resnet50c")]
)
def test_timm_export_loads_in_timm_with_the_same_logits_and_class_names(tmp_path, ours, theirs):
    timm = pytest.importorskip("timm", reason="timm is the test-only reference (pip install -e '.[dev]')")
    ckpt = write_checkpoint(tmp_path / "checkpoints", ours)
    out = tmp_path / "model.safetensors"
    summary = export_checkpoint(ckpt, "timm", out)
    assert summary["timm_model"] == theirs
    # exactly the call of the issue, plus num_classes (timm's default is 1000)
    model = timm.create_model(theirs, pretrained=True, pretrained_cfg_overlay=dict(file=str(out), num_classes=3))
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), random_model(ours)(x), atol=1e-5, rtol=1e-5)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        cfg = json.loads(f.metadata()["pretrained_cfg"])
    # the metadata is a whole overlay: timm's data config then gives the validation transform, with the names
    again = timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=cfg | {"file": str(out)})
    assert list(again.pretrained_cfg["label_names"]) == CLASSES
    data = timm.data.resolve_data_config({}, model=again)
    assert (
        tuple(data["input_size"]) == (3, 64, 64) and data["crop_pct"] == 0.875 and data["interpolation"] == "bilinear"
    )


@pytest.mark.parametrize("name", ["resnet18b", "resnet50b"])
def test_torchvision_export_loads_strictly_with_the_same_logits(tmp_path, name):
    import torchvision

    ckpt = write_checkpoint(tmp_path / "checkpoints", name)
    out = tmp_path / "model.pth"
    export_checkpoint(tmp_path, "torchvision", out)  # the run folder: its newest checkpoint, this one
    saved = torch.load(out, weights_only=True)
    assert saved["class_names"] == CLASSES and saved["dist_bot"]["checkpoint"] == str(ckpt)
    model = getattr(torchvision.models, name[:-1])(num_classes=3)
    model.load_state_dict(saved["state_dict"], strict=True)
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), random_model(name)(x), atol=1e-5, rtol=1e-5)


def test_ema_export_holds_the_ema_weights_and_a_checkpoint_without_them_says_how_to_get_them(tmp_path):
    ema = random_model("resnet18b", seed=1)  # other weights than model.pt's
    with_ema = write_checkpoint(tmp_path / "a", "resnet18b", ema=ema)
    export_checkpoint(with_ema, "torchvision", tmp_path / "ema.pth", ema=True)
    export_checkpoint(with_ema, "torchvision", tmp_path / "raw.pth")
    ema_sd, raw_sd = (torch.load(tmp_path / f, weights_only=True)["state_dict"] for f in ("ema.pth", "raw.pth"))
    assert torch.equal(ema_sd["fc.weight"], ema.fc.weight) and not torch.equal(raw_sd["fc.weight"], ema.fc.weight)
    assert torch.load(tmp_path / "ema.pth", weights_only=True)["dist_bot"]["weights"] == "ema"
    without = write_checkpoint(tmp_path / "b", "resnet18b")
    with pytest.raises(CheckpointError, match=r"has no EMA weights .* train with model.ema_decay=0.9998"):
        export_checkpoint(without, "timm", tmp_path / "x.safetensors", ema=True)


@pytest.mark.parametrize(
    ("name", "fmt", "works"),
    [("resnet50a", "timm", "onnx"), ("resnet18c", "timm", "onnx"), ("resnet18d", "torchvision", "timm, onnx")],
)
def test_a_format_without_a_twin_of_the_model_names_the_formats_that_work(tmp_path, name, fmt, works):
    ckpt = write_checkpoint(tmp_path / "checkpoints", name)
    with pytest.raises(ExportError, match=f"{name} cannot be exported as --format {fmt}") as e:
        export_checkpoint(ckpt, fmt, tmp_path / ("m.safetensors" if fmt == "timm" else "m.pth"))
    assert str(e.value).endswith(f"Formats that work: {works}")
    assert not list(tmp_path.glob("m.*"))


def test_the_output_name_must_fit_the_format(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "checkpoints", "resnet18d")
    code = main(["export", str(ckpt), "--format", "timm", "--out", str(tmp_path / "model.pth")])
    err = capsys.readouterr().err
    assert code == 2 and "name it model.safetensors (timm reads safetensors by that suffix)" in err
    assert err.count("\n") == 1


# -- predict and eval on a real run -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tiny_digits, tmp_path_factory):
    """One epoch of resnet18d on 100 digits, one process: a run folder as `dist-bot train` leaves it."""
    out = tmp_path_factory.mktemp("run")
    args = [*TINY, f"data.path={tiny_digits}", f"run.out_dir={out}", "schedule.epochs=1", "schedule.warmup_epochs=0"]
    assert main(["train", "configs/demo.yaml", *args]) == 0
    return out / "demo"


def test_a_run_records_its_class_names_in_label_order(tiny_run):
    meta = read_meta(list_checkpoints(tiny_run / "checkpoints")[-1])
    assert meta["class_names"] == [str(d) for d in range(10)]


def test_predict_prints_names_and_probabilities_from_the_run_and_its_exports_alike(tiny_run, tiny_digits, capsys):
    images = sorted(str(p) for p in (tiny_digits / "val").glob("*/*.jpg"))[:3]
    exported = tiny_run / "digits.safetensors"
    assert main(["export", str(tiny_run), "--format", "timm", "--out", str(exported)]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(list_checkpoints(tiny_run / "checkpoints")[-1])
    outputs = []
    for source in (tiny_run, exported):
        assert main(["predict", str(source), *images, "--topk", "3", "--json"]) == 0
        outputs.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    for a, b in zip(*outputs, strict=True):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert [t["prob"] for t in a["top"]] == pytest.approx([t["prob"] for t in b["top"]], abs=1e-6)
    assert [o["image"] for o in outputs[0]] == images
    for o in outputs[0]:
        assert len(o["top"]) == 3 and {t["class"] for t in o["top"]} <= {str(d) for d in range(10)}
        probs = [t["prob"] for t in o["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_predict_reports_a_bad_file_and_goes_on_with_the_rest(tiny_run, tiny_digits, tmp_path, capsys):
    good = sorted(str(p) for p in (tiny_digits / "val").glob("*/*.jpg"))[:2]
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    missing = tmp_path / "gone.png"
    code = main(["predict", str(tiny_run), good[0], str(bad), str(missing), good[1], "--topk", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    lines = out.splitlines()
    assert [x for x in lines if not x.startswith("  ")] == good and len(lines) == 2 + 2 * 2
    assert f"cannot read image {bad}" in err and f"cannot read image {missing}" in err
    assert "2 of 4 images could not be read" in err and "Traceback" not in err


@pytest.mark.slow  # the torch.export-based ONNX exporter takes ~15 s on 2 CPU cores
def test_onnx_export_matches_pytorch_within_1e_4_at_any_batch_size_and_predicts_alike(
    tiny_run, tiny_digits, tmp_path, caplog
):
    ort = pytest.importorskip("onnxruntime", reason="ONNX export needs pip install -e '.[export]'")
    import onnx

    out = tmp_path / "digits.onnx"
    with caplog.at_level(logging.INFO):  # as a training job's rank 0 logs (its W&B artifact is this export)
        assert export_checkpoint(tiny_run, "onnx", out)["max_abs_diff"] <= 1e-4
    assert not [r for r in caplog.records if r.name.startswith(ONNX_LOGGERS)]  # no line per exporter pass
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["class_names"]) == [str(d) for d in range(10)]
    assert json.loads(props["dist_bot"])["image_size"] == 32
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = load_predictor(tiny_run, device=torch.device("cpu")).logits
    for n in (1, 5):  # the batch dimension is dynamic; the export traced 2
        x = batch(n, px=32)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), atol=1e-4, rtol=0)
    images = sorted(str(p) for p in (tiny_digits / "val").glob("*/*.jpg"))[:4]
    ref = dict(predict_files(load_predictor(tiny_run), images, topk=10))
    got = dict(predict_files(load_predictor(out), images, topk=10))
    for path in images:
        assert dict(got[path]) == pytest.approx(dict(ref[path]), abs=1e-4)


def test_a_checkpoint_without_class_names_predicts_numbered_classes_with_a_warning(tmp_path, caplog):
    ckpt = write_checkpoint(tmp_path / "checkpoints", "resnet18d", class_names=None)
    with caplog.at_level(logging.WARNING):
        predictor = load_predictor(ckpt, device=torch.device("cpu"))
    assert predictor.info["class_names"] == ["class_0", "class_1", "class_2"]
    assert "predates class names" in caplog.text


def test_eval_takes_a_run_folder_and_ema_weights(tiny_run, tiny_digits, tmp_path, capsys):
    common = ["eval", str(tiny_run / "config.yaml"), f"data.path={tiny_digits}", "data.workers=0"]
    assert main([*common, "--checkpoint", str(tiny_run)]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    logged = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in logged if m["split"] == "val"][-1]
    assert result["samples"] == 40 and result["top1"] == pytest.approx(val["top1"]) and result["weights"] == "raw"

    assert main([*common, "--checkpoint", str(tiny_run), "--ema"]) == 2
    assert "has no EMA weights" in capsys.readouterr().err
    ckpt = list_checkpoints(tiny_run / "checkpoints")[-1]
    copy = shutil.copytree(ckpt, tmp_path / "step_with_ema")
    state = torch.load(copy / "model.pt", weights_only=True)
    write_file({k: v.clone().zero_() if k == "fc.weight" else v for k, v in state.items()}, copy / "ema.pt")
    assert main([*common, "--checkpoint", str(copy), "--ema"]) == 0
    ema = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert ema["weights"] == "ema" and ema["loss"] != pytest.approx(result["loss"])  # fc = 0: uniform logits

    assert main([*common, f"checkpoint={ckpt}"]) == 2
    assert "checkpoint=PATH is now an option: dist-bot eval CONFIG --checkpoint PATH" in capsys.readouterr().err


def test_eval_refuses_data_whose_classes_are_other_ones(tiny_run, tiny_digits, tmp_path, capsys):
    renamed = tmp_path / "renamed"
    for split in ("train", "val"):
        for d in sorted((tiny_digits / split).iterdir()):
            (renamed / split).mkdir(parents=True, exist_ok=True)
            (renamed / split / f"digit_{d.name}").symlink_to(d.resolve())
    # overrides may come after the options too
    code = main(["eval", str(tiny_run / "config.yaml"), "--checkpoint", str(tiny_run), f"data.path={renamed}"])
    assert code == 2 and "the checkpoint's class 0 is '0', the data's is 'digit_0'" in capsys.readouterr().err
