"""`dist-bot predict`: the top classes of image files, from a checkpoint, a run folder or an export.

The images get the run's validation transform (dist_bot/data/torch_loader.py: shorter side to
image_size / val_resize_ratio, center crop, the config's mean and std), read from the checkpoint's config or
from the export's "dist_bot" metadata. PyTorch models run on the GPU when there is one; ONNX files on
onnxruntime (its CUDA provider when installed and a GPU is there).

    predictor = load_predictor("runs/demo")               # or a step_N folder, x.safetensors, x.pth, x.onnx
    for path, result in predict_files(predictor, ["a.jpg", "b.png"], topk=5):
        ...                                               # result: [(class name, probability)], or a BadImageError
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import read_meta, read_weights, resolve_checkpoint
from .data.source import read_rgb
from .data.torch_loader import eval_transform, normalize
from .errors import BadImageError, CheckpointError, UserError
from .export import export_info, onnx_session
from .models import build_model
from .models.interop import from_timm

EXPORT_SUFFIXES = (".safetensors", ".pth", ".pt", ".onnx")


@dataclass
class Predictor:
    info: dict  # export_info: class names, image size, resize ratio, mean, std, model name
    logits: Callable[[torch.Tensor], torch.Tensor]  # a normalised float batch on `device` -> logits
    device: torch.device


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_predictor(state: dict, info: dict, device: torch.device) -> Predictor:
    model = build_model(info["model_name"], info["num_classes"])
    model.load_state_dict(state)
    model.eval().to(device)
    return Predictor(info, model, device)


def read_export_file(path: Path, device: torch.device) -> Predictor:
    """A predictor from a file `dist-bot export` wrote."""
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        info = json.loads(props["dist_bot"]) if "dist_bot" in props else None
        if info is not None:
            session = onnx_session(path, device)

            def run(x: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(session.run(None, {"images": x.cpu().numpy()})[0])

            return Predictor(info, run, torch.device("cpu"))
    elif path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        info = json.loads(metadata["dist_bot"]) if "dist_bot" in metadata else None
        if info is not None:
            return torch_predictor(from_timm(load_file(str(path)), info["model_name"]), info, device)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        info = obj.get("dist_bot") if isinstance(obj, dict) else None
        if info is not None:
            return torch_predictor(from_timm(obj["state_dict"], info["model_name"]), info, device)
    raise UserError(
        f"{path} holds no dist_bot metadata: predict reads the files `dist-bot export` writes, and checkpoint or run "
        "folders (name the folder, not its model.pt)"
    )


def load_predictor(source: str | Path, ema: bool = False, device: torch.device | None = None) -> Predictor:
    """A predictor from a checkpoint folder, a run folder (its newest good checkpoint) or an export file."""
    source, device = Path(source), device or default_device()
    if source.is_file() and source.suffix in EXPORT_SUFFIXES:
        if ema:
            raise UserError(f"{source} is an export, holding one set of weights: --ema applies to checkpoints")
        try:
            return read_export_file(source, device)
        except UserError:
            raise
        except ImportError as e:
            raise UserError(f"reading {source} needs {e.name}: pip install 'dist-bot[export]'") from None
        except Exception as e:  # damaged or foreign file
            raise UserError(f"cannot read export {source}: {type(e).__name__}: {e}") from None
    if source.is_file():
        raise CheckpointError(
            f"{source} is not an export ({', '.join(EXPORT_SUFFIXES)}) nor a folder: name a run folder, a "
            "checkpoint folder, or a file `dist-bot export` wrote"
        )
    path = resolve_checkpoint(source)
    meta = read_meta(path)
    return torch_predictor(read_weights(path, ema), export_info(path, meta, ema), device)


def predict_files(
    predictor: Predictor, paths: list[str], topk: int = 5, batch_size: int = 32
) -> Iterator[tuple[str, list[tuple[str, float]] | BadImageError]]:
    """(path, top-k (class name, probability)) per image in order, or (path, BadImageError) for a file that
    cannot be read; the others go on."""
    info = predictor.info
    transform = eval_transform(info["image_size"], info["val_resize_ratio"])
    names, k = info["class_names"], min(topk, info["num_classes"])
    for start in range(0, len(paths), batch_size):
        chunk, images, results = paths[start : start + batch_size], [], {}
        for path in chunk:
            try:
                images.append((path, transform(read_rgb(path))))
            except BadImageError as e:
                results[path] = e
        if images:
            x = torch.stack([im for _, im in images]).to(predictor.device).float().div_(255)
            with torch.no_grad():
                probs = predictor.logits(normalize(x, info["mean"], info["std"])).float().softmax(dim=1)
            top = probs.topk(k, dim=1)
            for (path, _), p, i in zip(images, top.values.tolist(), top.indices.tolist(), strict=True):
                results[path] = [(names[c], prob) for c, prob in zip(i, p, strict=True)]
        for path in chunk:
            yield path, results[path]
