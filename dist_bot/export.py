"""`dist-bot export`: a checkpoint's weights for other tools, with its class names and preprocessing inside.

    timm         FILE.safetensors under timm's key names. Metadata (JSON strings): "pretrained_cfg", timm's own
                 fields (architecture, num_classes, label_names = the class names, input_size, crop_pct, mean,
                 std, interpolation), and "dist_bot" (see export_info). Loads with
                 timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=FILE, num_classes=N)).
    torchvision  FILE.pth, torch.save of {"state_dict": torchvision's keys, "class_names": [...], "dist_bot": {...}},
                 for the ResNet-B family (torchvision's ResNets are ResNet-B): load_state_dict(obj["state_dict"]).
    onnx         FILE.onnx, one file: input "images" (N, 3, S, S) float32, normalised as in training; output
                 "logits" (N, classes); N is dynamic. Opset 20. metadata_props "class_names" and "dist_bot" (JSON).

Every export reads the checkpoint's raw weights (model.pt) or, with ``ema``, its EMA weights (ema.pt). The ONNX
and torchvision files are checked as they are written: their logits against dist_bot's model on a random batch.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from dist_bot import __version__

from .checkpoint import EMA_FILE, class_names, read_meta, read_weights, resolve_checkpoint
from .errors import ExportError
from .models import build_model
from .models.interop import timm_name, to_timm, torchvision_name

FORMATS = ("timm", "torchvision", "onnx")
SUFFIXES = {"timm": (".safetensors",), "torchvision": (".pth", ".pt"), "onnx": (".onnx",)}
ONNX_OPSET = 20  # the torch.export-based exporter's own default in torch 2.14: no version conversion pass
ONNX_LOGGERS = ("onnxscript", "onnx_ir")  # the exporter's passes
NEEDS = {"timm": ("safetensors",), "onnx": ("onnx", "onnxscript", "onnxruntime")}
CHECK_ATOL = 1e-4  # an export's logits vs dist_bot's model, float32 on CPU (observed: ~1e-6)


def export_info(path: Path, meta: dict, ema: bool) -> dict:
    """What travels with every export: the model, its classes, the preprocessing it was validated with, and where
    the weights come from. ``dist-bot predict`` reads its preprocessing from here."""
    data = meta["config"]["data"]
    return {
        "model_name": meta["model_name"],
        "num_classes": meta["num_classes"],
        "class_names": class_names(meta),
        "class_descriptions": meta.get("class_descriptions"),  # e.g. ImageNet's words for its WNIDs
        "image_size": data.get("val_image_size") or data["image_size"],  # validation's crop, which predict applies
        "val_resize_ratio": data["val_resize_ratio"],  # resize the shorter side to image_size / this, center crop
        "mean": list(data["mean"]),  # of RGB in [0, 1]
        "std": list(data["std"]),
        "weights": "ema" if ema else "raw",
        "checkpoint": str(path),
        "global_step": meta.get("global_step"),
        "dist_bot_version": __version__,
    }


def timm_pretrained_cfg(info: dict, architecture: str) -> dict:
    """timm's PretrainedCfg fields for this export: pass it as ``pretrained_cfg_overlay`` (with ``file``), and
    timm's own data config (``resolve_data_config``) gives dist_bot's validation transform."""
    cfg = {
        "architecture": architecture,
        "num_classes": info["num_classes"],
        "label_names": info["class_names"],
        "input_size": [3, info["image_size"], info["image_size"]],
        "crop_pct": info["val_resize_ratio"],
        "crop_mode": "center",
        "interpolation": "bilinear",  # torchvision's Resize default, which the validation transform uses
        "mean": info["mean"],
        "std": info["std"],
    }
    if info.get("class_descriptions"):
        cfg["label_descriptions"] = info["class_descriptions"]  # timm's ImageNetInfo reads it (name -> words)
    return cfg


def twin_name(fmt: str, model_name: str) -> str | None:
    """timm's or torchvision's name of ``model_name``; None for onnx (any model)."""
    if fmt == "onnx":
        return None
    twin = (timm_name if fmt == "timm" else torchvision_name)(model_name)
    if twin is None:
        works = [f for f in FORMATS if f == "onnx" or (timm_name if f == "timm" else torchvision_name)(model_name)]
        why = {
            "timm": "timm has no model of this architecture (ResNet-50/101/152-A strides in the first 1x1 conv, "
            "timm has no resnet18c/resnet34c, and no ResNet-10 but resnet10t, whose stem differs)",
            "torchvision": "torchvision's ResNets are ResNet-B only (resnet{18,34,50,101,152}b; A too for 18/34)",
        }[fmt]
        raise ExportError(
            f"{model_name} cannot be exported as --format {fmt}: {why}. Formats that work: {', '.join(works)}"
        )
    return twin


def atomic_output(out: Path) -> Path:
    """A temporary name beside ``out`` (renamed into place when complete: no half-written export)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f".{out.name}.tmp")


def write_timm(state: dict, info: dict, architecture: str, out: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in to_timm(state, info["model_name"]).items()}  # channels_last weights
    metadata = {"pretrained_cfg": json.dumps(timm_pretrained_cfg(info, architecture)), "dist_bot": json.dumps(info)}
    tmp = atomic_output(out)
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out)


def write_torchvision(state: dict, info: dict, out: Path) -> None:
    # One file, so the class names cannot be separated from the weights; plain types only, so that
    # torch.load(weights_only=True) reads it.
    obj = {
        "state_dict": {k: v.contiguous() for k, v in to_timm(state, info["model_name"]).items()},
        "class_names": info["class_names"],
        "dist_bot": info,
    }
    tmp = atomic_output(out)
    torch.save(obj, tmp)
    os.replace(tmp, out)


def write_onnx(model: torch.nn.Module, info: dict, out: Path) -> None:
    """torch.onnx.export with dynamo=True (the torch.export-based exporter): the default and maintained one in
    torch 2.14, where the TorchScript exporter is deprecated; these ResNets export without graph breaks."""
    x = torch.randn(2, 3, info["image_size"], info["image_size"])
    for name in ONNX_LOGGERS:  # they log each pass at INFO: dozens of lines in a training job's log
        logging.getLogger(name).setLevel(logging.WARNING)
    program = torch.onnx.export(
        model,
        (x,),
        dynamo=True,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        opset_version=ONNX_OPSET,
        verbose=False,
    )
    program.model.metadata_props["class_names"] = json.dumps(info["class_names"])
    program.model.metadata_props["dist_bot"] = json.dumps(info)
    tmp = atomic_output(out)
    program.save(str(tmp), external_data=False)  # one file (ResNet-152 is ~240 MB, far from protobuf's 2 GB)
    os.replace(tmp, out)


def onnx_session(path: Path, device: torch.device | None = None):
    """An onnxruntime session for ``path``, on the GPU when there is one and onnxruntime can use it."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if (device is None or device.type == "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), providers=providers)


def check_export(fmt: str, out: Path, model: torch.nn.Module, info: dict, twin: str | None) -> float | None:
    """Max |logits difference| between the written file, as its own tool loads it, and dist_bot's model."""
    x = torch.randn(2, 3, info["image_size"], info["image_size"], generator=torch.Generator().manual_seed(0))
    if fmt == "onnx":
        got = torch.from_numpy(onnx_session(out, torch.device("cpu")).run(None, {"images": x.numpy()})[0])
    elif fmt == "torchvision":
        import torchvision

        theirs = getattr(torchvision.models, twin)(num_classes=info["num_classes"])
        theirs.load_state_dict(torch.load(out, weights_only=True)["state_dict"], strict=True)
        with torch.no_grad():
            got = theirs.eval()(x)
    else:
        return None  # timm is not a dependency: tests/unit/test_export.py checks this format with timm itself
    with torch.no_grad():
        diff = (got - model(x)).abs().max().item()
    if not diff <= CHECK_ATOL:
        raise RuntimeError(f"the {fmt} export {out} gives logits that differ from the checkpoint's by {diff:.3g}")
    return diff


def export_checkpoint(source: str | Path, fmt: str, out: str | Path, ema: bool = False) -> dict:
    """Write the weights of ``source`` (a checkpoint folder, or a run folder: its newest good checkpoint) to
    ``out`` in format ``fmt``; returns a summary (what was written, from where, the check's difference)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.suffix not in SUFFIXES[fmt]:
        raise ExportError(
            f"--format {fmt} writes a {' or '.join(SUFFIXES[fmt])} file, got --out {out}: name it "
            f"{out.with_suffix(SUFFIXES[fmt][0]).name}" + (" (timm reads safetensors by that suffix)" * (fmt == "timm"))
        )
    # torch.onnx needs onnx and onnxscript, the check onnxruntime; the timm format is safetensors
    for module in NEEDS.get(fmt, ()):
        if importlib.util.find_spec(module) is None:
            raise ExportError(f"--format {fmt} needs {module}: pip install 'dist-bot[export]'")
    path = resolve_checkpoint(source)
    meta = read_meta(path)
    twin = twin_name(fmt, meta["model_name"])
    state = read_weights(path, ema)
    info = export_info(path, meta, ema)
    model = build_model(info["model_name"], info["num_classes"])
    model.load_state_dict(state)
    model.eval()
    if fmt == "timm":
        write_timm(state, info, twin, out)
    elif fmt == "torchvision":
        write_torchvision(state, info, out)
    else:
        write_onnx(model, info, out)
    diff = check_export(fmt, out, model, info, twin)
    summary = {"format": fmt, "out": str(out), "checkpoint": str(path), "weights": info["weights"]}
    summary |= {"model": info["model_name"], "classes": info["num_classes"]}
    summary |= {f"{fmt}_model": twin} if twin else {}
    return summary | ({"max_abs_diff": diff} if diff is not None else {})


def export_for_tracking(checkpoint: Path, out_dir: Path) -> list[Path]:
    """The final weights of a run as W&B's model artifact holds them (``wandb.log_model``): timm's safetensors
    where timm has the architecture (the format most tools read), else ONNX; the EMA beside the raw weights when
    the checkpoint has one. Returns the files written into ``out_dir``."""
    meta = read_meta(checkpoint)
    fmt = "timm" if timm_name(meta["model_name"]) else "onnx"
    suffix = SUFFIXES[fmt][0]
    written = []
    for ema in (False, True) if (checkpoint / EMA_FILE).is_file() else (False,):
        out = out_dir / f"{meta['model_name']}{'_ema' if ema else ''}{suffix}"
        export_checkpoint(checkpoint, fmt, out, ema=ema)
        written.append(out)
    return written
