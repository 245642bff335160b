"""Prediction benchmark: how far can a lab trust ``cellssl predict`` on new blood cells?

On the quality benchmark's fixed, stratified PBC split (``benchmarks.common.make_split``:
``pretrain`` 70 % / ``val`` 10 % / ``test`` 20 %, by file-name hash):

1. a linear probe (``cellssl linear``) on a frozen backbone, fitted on the ``pretrain`` part
   (at most ``--train-per-class`` images per class; its own stratified 20 % chooses C and the
   ``unsure`` thresholds), reported on ``val``;
2. ``cellssl predict`` on the ``test`` part (never seen): accuracy overall, on the confident part,
   and the share flagged unsure; the same for other target errors (re-chosen from the saved
   validation scores, as ``--target-error`` does);
3. ``cellssl export --format both`` of that classifier: ONNX vs torch max abs difference of the
   logits on real preprocessed test images, and on random inputs.

    python -m benchmarks.predict                             # random-init resnet18, 64 px (a few minutes on 2 cores)
    python -m benchmarks.predict --checkpoint runs/smear/checkpoints/last.pt

Prints the numbers and writes ``--work``/results.json. Cite PBC: Acevedo et al., Data in Brief 30
(2020), CC BY 4.0.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_PBC, REPO, command_line, make_split, require_folder

TARGETS = (0.01, 0.02, 0.05, 0.10, 0.20)


def curve(csv_path: Path, unsure: dict, classes: list[str]) -> list[dict]:
    """Accuracy of the confident part and share flagged, for each target error in TARGETS
    (size and unreadable flags as in the csv; confidence and distance thresholds re-chosen)."""
    from cellssl.eval.unsure import thresholds

    with csv_path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["predicted"] and r["true_class"]]
    conf = np.array([float(r["probability"]) for r in rows])
    dist = np.array([float(r["distance"]) for r in rows])
    hit = np.array([r["predicted"] == r["true_class"] for r in rows])
    other = np.array([any(x.startswith("size") for x in r["reason"].split("; ")) for r in rows])
    out = []
    for te in TARGETS:
        th = thresholds(unsure, te)
        flag = (conf < th["confidence_threshold"]) | (dist > th["distance_threshold"]) | other
        out.append({"target_error": te, "confidence_threshold": th["confidence_threshold"],
                    "flagged": float(flag.mean()),
                    "confident_accuracy": float(hit[~flag].mean()) if (~flag).any() else None,
                    "confident_error": float(1 - hit[~flag].mean()) if (~flag).any() else None})
    return out


def onnx_on_images(classifier: Path, onnx_path: Path, folder: Path, n: int = 64) -> float:
    """Max |onnxruntime - torch| of the logits on ``n`` preprocessed images of ``folder``."""
    import onnxruntime as ort
    import torch

    from cellssl.apply.model import load_predictor
    from cellssl.augment.views import build_eval_transform
    from cellssl.data.datasets import build_dataset

    pred = load_predictor(classifier, device="cpu")
    ds = build_dataset(pred.data_cfg, folder, labelled=None)
    t = build_eval_transform(pred.data_cfg, pred.in_chans)
    idx = np.linspace(0, len(ds) - 1, min(n, len(ds))).astype(int)
    x = torch.stack([t(ds.read(int(i))) for i in idx])
    with torch.no_grad():
        want = pred.model(x).numpy()
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    return float(np.abs(got - want).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_PBC))
    ap.add_argument("--work", default=str(REPO / "runs" / "predict_bench"))
    ap.add_argument("--checkpoint", default="random:resnet18", help="backbone to probe (default: random-init resnet18)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--train-per-class", type=int, default=400, help="probe training images per class (0 = all)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    data = require_folder(args.data, "PBC data")

    import torch

    from cellssl.apply.export import export
    from cellssl.apply.predict import predict
    from cellssl.eval.linear import linear

    work = Path(args.work)
    parts = make_split(data, Path(REPO / "runs" / "quality" / "split"))
    t0 = time.monotonic()
    lin = linear(args.checkpoint, parts["pretrain"], parts["val"], work / "linear", image_size=args.image_size,
                 device=args.device, max_per_class=args.train_per_class or None, plots=False)
    t_lin = time.monotonic() - t0
    classifier = Path(lin["classifier"])
    t1 = time.monotonic()
    rep = predict(classifier, parts["test"], work / "predict", device=args.device, sheet=48, progress=False,
                  overwrite=True)
    t_pred = time.monotonic() - t1
    ev = rep["evaluation"]
    unsure = torch.load(classifier, weights_only=True)["unsure"]
    cur = curve(work / "predict" / "predictions.csv", unsure, rep["classes"])
    cfg = export(classifier, work / "export", fmt="both", overwrite=True)
    onnx_random = cfg["cellssl"]["onnx"]["max_abs_diff_vs_torch"]
    onnx_real = onnx_on_images(classifier, work / "export" / "model.onnx", parts["test"])

    th = rep["unsure_rule"]
    results = {
        "command": command_line("predict"), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "date": time.strftime("%Y-%m-%d"), "checkpoint": args.checkpoint, "image_size": args.image_size,
        "n_train": lin["settings"]["n_train"], "val_accuracy": lin["accuracy"], "C": lin["C"],
        "n_test": ev["n_labelled"], "accuracy": ev["accuracy"], "confident_accuracy": ev["confident_accuracy"],
        "flagged_fraction": ev["flagged_fraction"], "unsure_accuracy": ev["unsure_accuracy"],
        "unsure_reasons": rep["unsure_reasons"], "rule": th, "curve": cur,
        "onnx_max_abs_diff_random": onnx_random, "onnx_max_abs_diff_images": onnx_real,
        "seconds_linear": round(t_lin, 1), "seconds_predict": round(t_pred, 1),
        "images_per_second_predict": round(rep["n_images"] / max(t_pred, 1e-9), 1),
    }
    (work / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")

    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    print(f"backbone {args.checkpoint} at {args.image_size} px; linear probe on {results['n_train']} PBC cells "
          f"(C={lin['C']:g}), val accuracy {pct(lin['accuracy'])} %")
    print(f"unsure rule: confidence < {th['confidence_threshold']:.3f} (target error {pct(th['target_error'])} % on "
          f"{th['n_val']} validation cells: {pct(th['val_accepted'])} % accepted at {pct(th['val_error'])} % error) "
          f"or distance > {th['distance_threshold']:.2f} ({100 * th['ood_quantile']:g}th percentile)")
    print(f"PBC test split, {ev['n_labelled']} cells never seen:")
    print(f"  accuracy, all cells        {pct(ev['accuracy'])} %")
    print(f"  accuracy, confident cells  {pct(ev['confident_accuracy'])} %")
    print(f"  flagged unsure             {pct(ev['flagged_fraction'])} %  (reasons: {rep['unsure_reasons']})")
    print(f"  accuracy, unsure cells     {pct(ev['unsure_accuracy'])} %")
    print("  target error -> flagged, confident accuracy:")
    for c in cur:
        print(f"    {pct(c['target_error']):>5} % -> {pct(c['flagged']):>5} % flagged, "
              f"{pct(c['confident_accuracy'])} % accurate (threshold {c['confidence_threshold']:.3f})")
    print(f"ONNX vs torch, max abs difference of the logits: {onnx_real:.2e} on 64 PBC test images, "
          f"{onnx_random:.2e} on random inputs")
    print(f"time: linear {t_lin:.0f} s, predict {t_pred:.0f} s ({results['images_per_second_predict']} images/s)")
    print(f"results: {work / 'results.json'}; report: {work / 'predict' / 'report.md'}")


if __name__ == "__main__":
    main()
