"""Hand a trained model on: ``model.safetensors`` for timm, ``config.json``, a model card, ONNX.

``export(checkpoint, out)`` accepts any cellssl checkpoint: a pretraining or adaptation run's
``last.pt`` (the backbone), finetune's ``best.pt`` or linear's ``classifier.pt`` (the backbone,
plus the classification head in ``head.safetensors``). It writes

- ``model.safetensors``: the backbone's state dict in timm's own names, so that
  ``timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"))``
  loads it (3-channel inputs, ``model.stem: default``). The file also holds a zero classifier
  (``fc.*`` for ResNets, the size of timm's default head) only so that this default 1000-class
  call loads strictly; the backbone has no classifier: pass ``num_classes=0`` for features.
- ``head.safetensors`` (classifiers): ``weight`` (K, F), ``bias`` (K,); the class names and
  whether features are L2-normalised first are in ``config.json``.
- ``model.onnx`` (``fmt="onnx"``/``"both"``): the backbone, or the whole classifier, with a dynamic
  batch axis; checked against torch with onnxruntime (max abs difference recorded).
- ``config.json``: timm's fields (``architecture``, ``pretrained_cfg`` with input size, mean,
  std) plus ``preprocessing`` (how to turn a file into the input tensor) and ``cellssl`` (the
  full recipe, provenance, classes); ``cellssl`` commands accept the folder as ``pretrained:DIR``.
- ``README.md``: the model card (recipe, data, steps, how to load, evaluation numbers found
  beside the checkpoint).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from cellssl import __version__
from cellssl.apply.model import load_predictor
from cellssl.apply.settings import EXPORT_FORMATS
from cellssl.augment.views import channel_stats
from cellssl.config import recipe_from_dict
from cellssl.data.io import check_output_folder, output_folder
from cellssl.engine.checkpoint import load_backbone, load_checkpoint, tensor_bytes
from cellssl.errors import CellSSLError, disk_full_as_error
from cellssl.eval.report import REPORT_KINDS, format_summary

__all__ = ["export", "EXPORT_FILES", "find_reports"]

EXPORT_FILES = ("model.safetensors", "head.safetensors", "model.onnx", "config.json", "README.md")


def _placeholder_head(name: str, in_chans: int, backbone_state: dict) -> dict[str, torch.Tensor]:
    """Zero tensors for the keys timm's default model of ``name`` has beyond the headless backbone."""
    try:
        full = timm.create_model(name, pretrained=False, in_chans=in_chans).state_dict()
    except Exception:  # an architecture timm cannot build with defaults: no placeholder
        return {}
    return {k: torch.zeros_like(v) for k, v in full.items() if k not in backbone_state}


def find_reports(checkpoint: Path, extra: list[str | Path] = ()) -> list[dict]:
    """Evaluation reports (cellssl ``report.json``-style files) given, or found beside the checkpoint
    and in its run folder (the folder above ``checkpoints/``)."""
    paths: list[Path] = [Path(p) for p in extra]
    for d in sorted({checkpoint.parent, checkpoint.parent.parent}):
        paths += sorted(d.glob("*.json"))
    out, seen = [], set()
    for p in paths:
        if p.resolve() in seen or not p.is_file():
            continue
        seen.add(p.resolve())
        try:
            rep = json.loads(p.read_text())
        except (OSError, ValueError):
            if p in [Path(x) for x in extra]:
                raise CellSSLError(f"--report {p} is not a readable json report") from None
            continue
        if isinstance(rep, dict) and rep.get("kind") in REPORT_KINDS:
            rep["_file"] = str(p)
            out.append(rep)
    return out


def _onnx(model: nn.Module, path: Path, in_chans: int, size: int, output: str, opset: int) -> dict:
    """torch -> ONNX with a dynamic batch axis; max |onnxruntime - torch| on a batch of 3."""
    try:
        import onnx  # noqa: F401  (the exporter writes through it)
    except ImportError:
        raise CellSSLError("--format onnx needs the onnx package: pip install 'cellssl[onnx]' "
                           "(onnx, onnxruntime)") from None
    model = model.eval().cpu()
    dummy = torch.randn(2, in_chans, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, dummy, str(path), input_names=["images"], output_names=[output],
                          dynamic_axes={"images": {0: "batch"}, output: {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    info: dict[str, Any] = {"file": path.name, "input": "images", "output": output, "opset": opset,
                            "input_shape": ["batch", in_chans, size, size]}
    try:
        import onnxruntime as ort  # optional extra [onnx]
    except ImportError:
        info["check"] = "onnxruntime not installed: not compared with torch"
        return info
    x = torch.randn(3, in_chans, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x.numpy()})[0]
    info["max_abs_diff_vs_torch"] = float(np.abs(got - ref).max())
    info["check"] = f"onnxruntime {ort.__version__} vs torch {torch.__version__} on a batch of 3"
    return info


def export(
    checkpoint: str | Path,
    out: str | Path,
    *,
    fmt: str = EXPORT_FORMATS[0],
    reports: list[str | Path] = (),
    opset: int = 17,
    overwrite: bool = False,
) -> dict:
    """Export ``checkpoint`` to the folder ``out`` (see the module docstring); returns config.json's dict.

    The files are written to a hidden temporary folder renamed to ``out`` when all are written, so an
    interrupted export leaves no ``out`` (or the earlier one, whole). An ``out`` that holds files is
    refused; ``overwrite`` replaces an earlier export as a whole (no file of it stays). A full disk is
    a one-line :class:`~cellssl.errors.DiskFullError` (the space needed, what is kept)."""
    if fmt not in EXPORT_FORMATS:
        raise CellSSLError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.suffix:
        raise CellSSLError(f"--out {out} must be a folder (model.safetensors, config.json and README.md go in it)")
    check_output_folder(out, overwrite=overwrite, command="export", own_files=EXPORT_FILES, marker="config.json")
    checkpoint = Path(checkpoint)
    ck = load_checkpoint(checkpoint)
    recipe = recipe_from_dict(ck["config"])
    in_chans, size = int(ck["in_chans"]), int(recipe.data.image_size)
    is_classifier = bool(ck.get("classes")) and "head.weight" in (ck.get("model") or {})
    pred = load_predictor(checkpoint, device="cpu") if is_classifier else None
    backbone = pred.model.backbone if pred is not None else load_backbone(checkpoint)[0]
    backbone.eval()
    name = recipe.model.backbone
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    placeholder = _placeholder_head(name, in_chans, state) if recipe.model.stem == "default" else {}
    with torch.no_grad():
        n_features = int(backbone(torch.zeros(1, in_chans, size, size)).shape[1])
    needed = tensor_bytes(state) * (2 if fmt == "both" else 1) + tensor_bytes(placeholder)
    kept = f"{out} is unchanged" if out.is_dir() and any(out.iterdir()) else f"nothing was written to {out}"
    with disk_full_as_error(out, needed, kept), output_folder(out, replace=overwrite) as tmp:
        config = _write_export(tmp, out, checkpoint, ck, fmt, state, placeholder, n_features, backbone, pred,
                               reports, opset)
    return config


def _write_export(tmp: Path, out: Path, checkpoint: Path, ck: dict, fmt: str, state: dict, placeholder: dict,
                  n_features: int, backbone: nn.Module, pred: Any, reports: list[str | Path], opset: int) -> dict:
    """Write the export's files into ``tmp`` (renamed to ``out`` by the caller): the backbone's ``state``
    (+ timm's ``placeholder`` head), a classifier's head when ``pred`` is one; returns config.json's dict."""
    recipe = recipe_from_dict(ck["config"])
    in_chans, size = int(ck["in_chans"]), int(recipe.data.image_size)
    files = []
    if fmt in ("safetensors", "both"):
        files.append(_write_weights(tmp / "model.safetensors", recipe.model.backbone, state, placeholder))
    head = _write_head(tmp / "head.safetensors", pred) if pred is not None else None
    if head is not None:
        files.append(head["file"])
    onnx_info = None
    if fmt in ("onnx", "both"):
        onnx_info = _write_onnx(tmp / "model.onnx", backbone, pred, in_chans, size, opset)
        files.append(onnx_info["file"])
    timm_cfg = _timm_cfg(recipe.data, in_chans, size, placeholder, backbone)
    config = {
        "architecture": recipe.model.backbone,
        "num_classes": timm_cfg["num_classes"],
        "num_features": n_features,
        "pretrained_cfg": timm_cfg,
        "model_args": {"in_chans": in_chans},
        "preprocessing": _preprocessing(recipe.data, in_chans, size),
        "cellssl": {
            "version": __version__,
            "exported": datetime.datetime.now().isoformat(timespec="seconds"),
            "source_checkpoint": str(checkpoint.resolve()),
            "kind": ck.get("kind", "pretrain"),
            "method": ck.get("method"),
            "step": ck.get("step"),
            "stem": recipe.model.stem,
            "timm_loadable": recipe.model.stem == "default",
            "placeholder_classifier_keys": sorted(placeholder),
            "recipe": ck["config"],
            "head": head,
            "onnx": onnx_info,
            "evaluation": [_report_line(r) for r in find_reports(checkpoint, list(reports))],
            "files": files,
        },
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "README.md").write_text(_card(config, ck, out))
    return config


def _write_weights(path: Path, name: str, state: dict, placeholder: dict) -> str:
    """``model.safetensors``: the backbone's state and timm's placeholder head; returns the file name."""
    meta = {"format": "pt", "producer": f"cellssl {__version__}", "architecture": name,
            "placeholder_keys": ",".join(sorted(placeholder))}
    save_file({**state, **placeholder}, str(path), metadata=meta)
    return path.name


def _write_head(path: Path, pred: Any) -> dict:
    """``head.safetensors`` of a classifier (``weight`` (K, F), ``bias`` (K,), the class names in its
    metadata); returns config.json's ``head``."""
    classifier = pred.model
    save_file({"weight": classifier.head.weight.detach().contiguous(),
               "bias": classifier.head.bias.detach().contiguous()},
              str(path), metadata={"classes": json.dumps(list(pred.classes))})
    return {"classes": list(pred.classes), "normalize": bool(classifier.normalize), "file": path.name,
            "tta": classifier.tta,
            "math": "logits = weight @ (f / ||f||_2 if normalize else f) + bias; probabilities = softmax(logits)"
                    + ("; f = the mean of the backbone's features over the image's 8 rotations and flips"
                       if classifier.tta == "dihedral" else "")}


def _write_onnx(path: Path, backbone: nn.Module, pred: Any, in_chans: int, size: int, opset: int) -> dict:
    """``model.onnx``: the whole classifier when ``pred`` is one, else the backbone; returns config.json's ``onnx``."""
    if pred is not None:
        info = _onnx(pred.model, path, in_chans, size, "logits", opset)
        info["model"] = "classifier (backbone + head)"
    else:
        info = _onnx(backbone, path, in_chans, size, "features", opset)
        info["model"] = "backbone"
    return info


def _timm_cfg(data_cfg: Any, in_chans: int, size: int, placeholder: dict, backbone: nn.Module) -> dict:
    """timm's ``pretrained_cfg``: input size, mean and std, the placeholder head's class count, and
    the backbone's own ``first_conv`` / ``classifier`` names."""
    mean, std = channel_stats(data_cfg, in_chans)
    cfg = {
        "tag": "cellssl", "input_size": [in_chans, size, size], "fixed_input_size": False,
        "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
        "mean": [float(m) for m in mean], "std": [float(s) for s in std],
        "num_classes": int(next((v.shape[0] for k, v in placeholder.items() if k.endswith("weight")), 0)),
    }
    pc = getattr(backbone, "pretrained_cfg", None) or {}
    cfg.update({key: pc[key] for key in ("first_conv", "classifier") if pc.get(key)})
    return cfg


def _preprocessing(data_cfg: Any, in_chans: int, size: int) -> dict:
    """config.json's ``preprocessing``: how to turn a file into the model's input tensor."""
    mean, std = channel_stats(data_cfg, in_chans)
    data = dataclasses.asdict(data_cfg)
    return {
        "channels": in_chans,
        "image_size": size,
        "resize": f"the whole image to {size}x{size} px (cv2 INTER_AREA when shrinking, bilinear when enlarging)",
        "values": "pixels scaled to [0, 1] first: "
                  + ("8-bit / 255, other types by percentiles" if data["intensity"] == "auto" else data["intensity"]),
        "normalise": "(x - mean) / std per channel",
        "mean": [float(m) for m in mean], "std": [float(s) for s in std],
        "modality": data["modality"], "intensity": data["intensity"], "percentiles": data["percentiles"],
        "percentile_scope": data["percentile_scope"], "stain_normalize": data["stain_normalize"],
    }


def _report_line(report: dict) -> dict:
    lines = [x for x in format_summary(report).splitlines() if not x.startswith("report:")]
    return {"kind": report.get("kind"), "file": report.get("_file"), "summary": " ".join(x.strip() for x in lines)}


def _card(config: dict, ck: dict, out: Path) -> str:
    """The model card (README.md) of an export: how it was trained, its preprocessing, how to load it
    (timm, the head, ONNX, cellssl), the evaluations found, the files."""
    c = config["cellssl"]
    lines = [*_card_training(config, ck), *_card_preprocessing(config["preprocessing"]), "## Use it", "",
             *_card_timm(config, out), *_card_head(c["head"]), *_card_onnx(c["onnx"]), *_card_cellssl(config, out),
             "## Evaluation", ""]
    if c["evaluation"]:
        lines += [f"- {e['kind']}: {e['summary']} (`{e['file']}`)" for e in c["evaluation"]]
    else:
        lines.append("No evaluation report was found beside the checkpoint (pass `--report FILE`).")
    lines += ["", "## Files", ""] + [f"- `{f}`" for f in c["files"] + ["config.json", "README.md"]]
    return "\n".join(lines) + "\n"


def _card_training(config: dict, ck: dict) -> list[str]:
    """The card's title and "How it was trained"."""
    c = config["cellssl"]
    r = c["recipe"]
    p = config["preprocessing"]
    name, chans, size = config["architecture"], p["channels"], p["image_size"]
    kind = {"finetune": "fine-tuned classifier", "linear": "frozen backbone + linear probe"}.get(c["kind"], "backbone")
    train = r.get("train", {})
    lines = [f"# {name} ({kind}) — cellssl {c['version']}", "",
             f"A {name} backbone for {chans}-channel {p['modality']} cell images at {size} px, exported from "
             f"`{c['source_checkpoint']}` on {c['exported'][:10]}.", "",
             "## How it was trained", "",
             f"- method: {c['method']}, step {c['step']}"
             + (f" (of {train.get('max_steps')})" if train.get("max_steps") else ""),
             f"- recipe: {r.get('name', '?')} — {r.get('description', '') or 'no description'}",
             f"- data: `{r.get('data', {}).get('path') or 'built-in synthetic smears'}`",
             f"- starting weights: {r.get('model', {}).get('pretrained') or 'random initialisation'}",
             f"- batch size {train.get('batch_size', '?')}, views {r.get('views', {}).get('n_views', '?')}, "
             f"optimiser {r.get('optim', {}).get('name', '?')} (lr {r.get('optim', {}).get('lr', '?')}), "
             f"stem `{c['stem']}`"]
    if ck.get("source"):
        lines.append(f"- backbone of this classifier: `{ck['source']}`")
    if c["head"]:
        lines.append(f"- classes ({len(c['head']['classes'])}): {', '.join(c['head']['classes'])}")
    return lines + [""]


def _card_preprocessing(p: dict) -> list[str]:
    return ["## Preprocessing", "",
            f"1. read the image; {p['values']}", f"2. resize {p['resize']}",
            f"3. normalise `(x - mean) / std` with mean {p['mean']} and std {p['std']}",
            f"4. tensor `(batch, {p['channels']}, {p['image_size']}, {p['image_size']})`, float32", ""]


def _card_timm(config: dict, out: Path) -> list[str]:
    """Loading the backbone with timm (or why a plain ``timm.create_model`` cannot)."""
    c = config["cellssl"]
    p = config["preprocessing"]
    name, chans, size = config["architecture"], p["channels"], p["image_size"]
    if not c["timm_loadable"]:
        return [f"`model.stem: {c['stem']}` replaces timm's ResNet stem, so a plain `timm.create_model` cannot hold "
                "these weights; load them with cellssl (below).", ""]
    extra = "" if chans == 3 else f", in_chans={chans}"
    overlay = "" if chans == 3 else f", input_size=({chans}, {size}, {size})"
    lines = ["With timm (features, `(batch, {})`):".format(config["num_features"]), "", "```python", "import timm",
             f"model = timm.create_model(\"{name}\", pretrained=True, num_classes=0{extra},",
             "                          pretrained_cfg_overlay=dict("
             f"file=\"{out.name}/model.safetensors\"{overlay}))",
             "features = model(images)  # images preprocessed as above", "```", ""]
    if c["placeholder_classifier_keys"]:
        lines += [f"Without `num_classes=0` timm builds its default {config['num_classes']}-class model; the file "
                  f"holds zeros for that classifier ({', '.join(c['placeholder_classifier_keys'])}) so the "
                  "default call loads too: then use "
                  "`model.forward_head(model.forward_features(x), pre_logits=True)`.", ""]
    return lines


def _card_head(head: dict | None) -> list[str]:
    """Using a classifier's ``head.safetensors``."""
    if not head:
        return []
    norm = "f = f / f.norm(dim=1, keepdim=True)\n" if head["normalize"] else ""
    # the probe was fitted on orientation-averaged features (cellssl.models.orientation): so is f
    features = ("f = torch.stack([model(torch.rot90(x, k, (2, 3))) for x in (images, images.flip(3)) "
                "for k in range(4)]).mean(0)  # the mean over the 8 rotations and flips, as the probe was fitted"
                if head.get("tta") == "dihedral" else "f = model(images)")
    return ["The classifier head (`head.safetensors`):", "", "```python",
            "from safetensors.torch import load_file",
            "head = load_file(\"head.safetensors\")",
            f"{features}\n{norm}probabilities = (f @ head[\"weight\"].T + head[\"bias\"]).softmax(1)",
            f"classes = {head['classes']}", "```", ""]


def _card_onnx(o: dict | None) -> list[str]:
    """Running ``model.onnx`` with onnxruntime."""
    if not o:
        return []
    diff = o.get("max_abs_diff_vs_torch")
    return [f"ONNX (`model.onnx`, {o['model']}, input `images` `{o['input_shape']}`, output `{o['output']}`, "
            f"opset {o['opset']}, dynamic batch)" + (f"; max abs difference to torch {diff:.2e} ({o['check']})"
                                                     if diff is not None else f"; {o['check']}") + ":", "",
            "```python", "import onnxruntime as ort",
            "session = ort.InferenceSession(\"model.onnx\")",
            f"{o['output']} = session.run(None, {{\"images\": images.numpy()}})[0]", "```", ""]


def _card_cellssl(config: dict, out: Path) -> list[str]:
    """The export folder as a starting point for the cellssl commands."""
    stem, name = config["cellssl"]["stem"], config["architecture"]
    return ["With cellssl (the folder is a starting point for every command):", "", "```bash",
            f"cellssl linear   --checkpoint pretrained:{out.name} --train labelled/ --split 0.3 --out eval/",
            f"cellssl finetune --checkpoint pretrained:{out.name} --data labelled/ --out runs/ft",
            f"cellssl pretrain --recipe blood_smear --data cells/ --backbone {name} --set model.pretrained={out.name}"
            + (f" --set model.stem={stem}" if stem != "default" else ""), "```", ""]
