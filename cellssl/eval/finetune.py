"""Supervised fine-tuning of a pretrained backbone on a lab's labelled folder.

Model: the checkpoint's backbone ``f`` (from :func:`~cellssl.engine.checkpoint.load_backbone`,
so ``random:<timm name>`` gives the from-scratch baseline through the same path) and a linear
head ``W f(x) + b``. Training: cross-entropy, AdamW (head lr 1e-3, backbone lr 1e-4 by
default; ``freeze_backbone`` trains only the head), cosine learning-rate decay, class-balanced
sampling (``WeightedRandomSampler`` with weight 1 / class count), augmentation = the first view
of the checkpoint recipe's multi-view transform. Early stopping on validation accuracy; the best
model is saved as a weights-only checkpoint whose ``backbone.*`` keys make it loadable by
``load_backbone`` (so the fine-tuned backbone can be evaluated with the other commands).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from tqdm.auto import tqdm

from cellssl.augment.views import build_eval_transform, build_view_transform
from cellssl.data.datasets import TransformedDataset, split_indices
from cellssl.engine.checkpoint import FORMAT, check_new_run, save_atomic
from cellssl.errors import DataError
from cellssl.eval.features import FeatureExtractor, class_lut
from cellssl.eval.metrics import classification_metrics
from cellssl.eval.probes import Classifier, softmax
from cellssl.eval.report import FINETUNE, report_paths, write_report
from cellssl.eval.unsure import calibrate, native_size

__all__ = ["finetune", "select_low_label", "logits_and_features"]


@torch.no_grad()
def logits_and_features(model: Classifier, ds: Dataset, device: torch.device, batch_size: int = 128,
                        num_workers: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass of ``model`` over ``ds`` (items ``(tensor, label)``): logits (N, K), features (N, F)
    and labels (N,), in order, in eval mode."""
    model.eval()
    logits, feats, ys = [], [], []
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        f = model.features(x.to(device).float())
        logits.append(model.classify(f).float().cpu().numpy())
        feats.append(f.float().cpu().numpy())
        ys.append(np.asarray(y))
    if not ys:
        return np.zeros((0, model.head.out_features)), np.zeros((0, model.head.in_features)), np.zeros(0, np.int64)
    return np.concatenate(logits), np.concatenate(feats), np.concatenate(ys).astype(np.int64)


def select_low_label(labels: np.ndarray, k: int, val_fraction: float, seed: int = 0,
                     class_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Low-label split: exactly ``k`` random training images per class; validation from the rest.

    The validation set takes ``round(val_fraction * N)`` images, stratified, from the images not
    chosen for training (all of them when fewer remain). Raises DataError naming a class with
    fewer than ``k`` images. Returns sorted index arrays ``(train, val)``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    small = [(int(c), int(n)) for c, n in zip(classes, counts) if n < k]
    if small:
        c, n = small[0]
        name = class_names[c] if class_names and 0 <= c < len(class_names) else str(c)
        raise DataError(
            f"--labels-per-class {k}: class '{name}' has only {n} training image(s); lower --labels-per-class"
        )
    train, rest = [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:k])
        rest.append(idx[k:])
    rest_all = np.concatenate(rest) if rest else np.zeros(0, dtype=np.int64)
    n_val = min(len(rest_all), int(round(val_fraction * len(labels))))
    val = []
    if n_val > 0 and len(rest_all):
        share = n_val / len(rest_all)
        for r in rest:
            if len(r):
                val.append(r[: max(1, int(round(share * len(r))))])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(train)).astype(np.int64), val_idx.astype(np.int64)


def _predict(model: nn.Module, ds: Dataset, device: torch.device, batch_size: int,
             num_workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(true labels (N,), predicted labels (N,)) of ``ds``."""
    logits, _, ys = logits_and_features(model, ds, device, batch_size, num_workers)
    return ys, logits.argmax(axis=1).astype(np.int64)


class _Relabel(Dataset):
    def __init__(self, base: Dataset, lut: np.ndarray):
        self.base, self.lut = base, lut

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[i]
        return x, int(self.lut[y])


def finetune(
    checkpoint: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.2,
    test: str | Path | None = None,
    split: float | None = None,
    epochs: int = 20,
    labels_per_class: int | None = None,
    freeze_backbone: bool = False,
    lr: float | None = None,
    batch_size: int = 64,
    device: str = "auto",
    seed: int = 0,
    patience: int = 5,
    image_size: int | None = None,
    num_workers: int = 0,
    weight_decay: float = 1e-4,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Fine-tune ``checkpoint`` + a linear head on the labelled folder ``data``.

    Splits: the test set is the folder ``test``, or a stratified ``split`` fraction of ``data``
    (``seed``), or none. Of the rest, a stratified ``val_fraction`` validates (early stopping);
    with ``labels_per_class`` K only K random images per class train (the low-label setting) and
    validation comes from the remaining images. ``lr`` sets the head's learning rate (backbone:
    ``lr / 10``); default 1e-3 / 1e-4. Stops after ``patience`` epochs without a better
    validation accuracy; the best model goes to ``out_dir/best.pt`` and is evaluated on the test set.
    ``best.pt`` is marked incomplete (refused by every command) until the run has ended. An ``out_dir``
    that holds a finetune run (``best.pt``) is refused unless ``overwrite`` (its files are then removed
    when training starts).

    Returns the report (also written to ``out_dir/report.json`` + ``report.md`` + confusion plot):
    ``history`` [{epoch, train_loss, train_accuracy, val_accuracy, lr}], ``best_epoch``,
    ``best_val_accuracy``, ``validation`` and ``test`` metrics (accuracy, balanced_accuracy,
    macro_f1, confusion_matrix, per_class_accuracy), ``classes``, ``settings``, ``checkpoint``.
    """
    out_dir = Path(out_dir).parent if Path(out_dir).suffix == ".json" else Path(out_dir)
    if epochs < 1:
        raise DataError(f"--epochs must be at least 1, got {epochs}")
    check_new_run(out_dir, what="a finetune run", overwrite=overwrite, checkpoint="best.pt", resumable=False)
    t0 = time.monotonic()
    torch.manual_seed(seed)
    ex = FeatureExtractor(checkpoint, image_size=image_size, batch_size=batch_size, device=device, seed=seed,
                          num_workers=num_workers, progress=progress)
    base, _ = ex.build(data, labelled=True)
    ex.prepare(base.channels)  # loads the backbone for these channels (one code path for random: and checkpoints)
    eval_t = build_eval_transform(ex.data_cfg, base.channels)
    splits = _splits(ex, base, eval_t, data, test, split, val_fraction, labels_per_class, seed)
    model = Classifier(ex.backbone, _n_features(ex, base.channels), len(base.classes)).to(ex.device)
    optimizer = _optimizer(model, 1e-3 if lr is None else float(lr), freeze_backbone, weight_decay)
    loader = _balanced_loader(ex, base, splits.train_idx, batch_size, num_workers, seed)
    val_ds = TransformedDataset(base, eval_t, splits.val_idx) if len(splits.val_idx) else None
    best_path = out_dir / "best.pt"
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [best_path, *report_paths(out_dir).values()] if overwrite else []:
        old.unlink(missing_ok=True)  # the replaced run's files must not stand beside the new ones
    ev = {"device": ex.device, "batch_size": max(batch_size, 128), "num_workers": num_workers}  # evaluation passes
    fitted = _train_epochs(model, optimizer, loader, val_ds, _best_saver(ex, base, checkpoint, best_path), ev,
                           epochs=epochs, patience=patience, freeze_backbone=freeze_backbone, progress=progress)
    model.load_state_dict(fitted.best_state)
    best_ckpt = _calibrate_unsure(model, best_path, base, TransformedDataset(base, eval_t, splits.train_idx), val_ds,
                                  ev)
    report = _report(model, fitted, base.classes, val_ds, splits.test, ev, epochs)
    report["best_checkpoint"] = str(best_path)
    report["checkpoint"] = {**ex.describe(data), "test_data": splits.test_data}
    report["settings"] = {
        "epochs": epochs, "epochs_run": len(fitted.history), "patience": patience,
        "labels_per_class": labels_per_class, "freeze_backbone": freeze_backbone,
        "head_lr": optimizer.param_groups[0]["base_lr"],
        "backbone_lr": None if freeze_backbone else optimizer.param_groups[1]["base_lr"],
        "weight_decay": weight_decay, "batch_size": batch_size, "val_fraction": val_fraction, "split": split,
        "seed": seed, "n_train": int(len(splits.train_idx)), "n_val": int(len(splits.val_idx)),
        "n_test": int(len(splits.test)) if splits.test is not None else 0, "image_size": int(ex.data_cfg.image_size),
        "augmentation": "one view of the recipe's multi-view transform", "sampling": "class-balanced",
        "minutes": round((time.monotonic() - t0) / 60, 2),
    }
    write_report(report, out_dir / "report.json", FINETUNE)
    save_atomic(best_ckpt, best_path)  # complete: calibrated, reported
    return report


@dataclass
class _Splits:
    """Rows of the labelled folder that train and validate, the test set and what it is."""

    train_idx: np.ndarray
    val_idx: np.ndarray
    test: Dataset | None
    test_data: str | None


def _splits(ex: FeatureExtractor, base: Any, eval_t: Any, data: str | Path, test: str | Path | None,
            split: float | None, val_fraction: float, labels_per_class: int | None, seed: int) -> _Splits:
    """The test set (the ``test`` folder, relabelled by class name, or a stratified ``split`` of
    ``data``), then of the rest the low-label training rows (``labels_per_class``) or a stratified
    ``val_fraction`` for validation. DataError for fewer than 2 training images of 2 classes."""
    labels, classes, channels = base.labels, list(base.classes), base.channels
    test_ds, test_data, pool = None, None, np.arange(len(labels))
    if test is not None:
        tbase, _ = ex.build(test, labelled=True)
        if tbase.channels != channels:
            raise DataError(f"test folder {test} has {tbase.channels}-channel images but {data} has {channels}")
        lut = class_lut(tbase.classes, tbase.labels, classes, f"the test folder {test}")
        test_ds, test_data = _Relabel(TransformedDataset(tbase, eval_t), lut), str(test)
    elif split is not None:
        if not 0 < split < 1:
            raise DataError(f"--split must be a fraction between 0 and 1 (e.g. 0.3), got {split}")
        pool, held = split_indices(labels, (1 - split, split), seed=seed, stratified=True)
        test_ds = TransformedDataset(base, eval_t, held)
        test_data = f"{split:g} stratified split of {data} (seed {seed})"
    if labels_per_class:
        tr_rel, va_rel = select_low_label(labels[pool], int(labels_per_class), val_fraction, seed, classes)
    elif val_fraction and val_fraction > 0:
        tr_rel, va_rel = split_indices(labels[pool], (1 - val_fraction, val_fraction), seed=seed, stratified=True)
    else:
        tr_rel, va_rel = np.arange(len(pool)), np.zeros(0, dtype=np.int64)
    train_idx, val_idx = pool[tr_rel], pool[va_rel]
    if len(train_idx) < 2 or len(np.unique(labels[train_idx])) < 2:
        raise DataError(f"fine-tuning needs at least 2 training images of 2 classes in {data}; got {len(train_idx)}")
    return _Splits(train_idx, val_idx, test_ds, test_data)


def _n_features(ex: FeatureExtractor, channels: int) -> int:
    """The backbone's feature width F (``num_features``, else one dry forward)."""
    n_feat = getattr(ex.backbone, "num_features", None)
    if not n_feat:
        with torch.no_grad():
            s = int(ex.data_cfg.image_size)
            n_feat = int(ex.backbone(torch.zeros(1, channels, s, s, device=ex.device)).shape[1])
    return int(n_feat)


def _optimizer(model: Classifier, head_lr: float, freeze_backbone: bool, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the head (``head_lr``) and, unless frozen, the backbone (``head_lr / 10``); each group
    keeps its peak as ``base_lr`` for the cosine decay."""
    groups = [{"params": model.head.parameters(), "lr": head_lr}]
    if freeze_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    else:
        groups.append({"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": head_lr / 10.0})
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def _balanced_loader(ex: FeatureExtractor, base: Any, train_idx: np.ndarray, batch_size: int, num_workers: int,
                     seed: int) -> DataLoader:
    """Class-balanced batches (``WeightedRandomSampler``, weight 1 / class count) of one augmented
    view per image (the checkpoint recipe's view transform)."""
    labels = base.labels[train_idx]
    counts = np.bincount(labels, minlength=len(base.classes)).astype(np.float64)
    sampler = WeightedRandomSampler(torch.as_tensor(1.0 / counts[labels], dtype=torch.double),
                                    num_samples=len(train_idx), replacement=True,
                                    generator=torch.Generator().manual_seed(seed))
    views = build_view_transform(ex.recipe.views, ex.data_cfg, base.channels, seed=seed)
    drop_last = len(train_idx) > batch_size and len(train_idx) % batch_size == 1
    return DataLoader(TransformedDataset(base, views.one_view, train_idx), batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, drop_last=drop_last, pin_memory=ex.device.type == "cuda",
                      persistent_workers=num_workers > 0)


def _best_saver(ex: FeatureExtractor, base: Any, checkpoint: str | Path, path: Path):
    """A callable (epoch, val_accuracy, state) writing ``best.pt``: a weights-only checkpoint whose
    ``backbone.*`` keys :func:`~cellssl.engine.checkpoint.load_backbone` reads. It is marked
    ``incomplete`` (every command refuses it) until the run ends with its calibration."""
    config = copy.deepcopy(ex.info["config"])
    config.setdefault("data", {})["image_size"] = int(ex.data_cfg.image_size)

    def save(epoch: int, val_acc: float | None, state: dict) -> None:
        save_atomic({"format": FORMAT, "kind": "finetune", "method": "finetune", "step": epoch, "epoch": epoch,
                     "config": config, "in_chans": int(base.channels), "classes": list(base.classes),
                     "val_accuracy": val_acc, "source": str(checkpoint), "model": state, "incomplete": True}, path)

    return save


@dataclass
class _Fitted:
    """The epochs run and the best of them (its epoch, score and weights)."""

    history: list[dict]
    best_epoch: int
    best_score: float
    best_state: dict


def _train_epochs(model: Classifier, optimizer: torch.optim.Optimizer, loader: DataLoader, val_ds: Dataset | None,
                  save_best, ev: dict, *, epochs: int, patience: int, freeze_backbone: bool, progress: bool) -> _Fitted:
    """Epochs with a cosine-decayed learning rate; the best epoch (validation accuracy, or the lowest
    training loss without validation) is kept and saved; stops after ``patience`` epochs without a
    better one."""
    history: list[dict] = []
    best = _Fitted(history, 0, -math.inf, {})
    bad_epochs = 0
    bar: Any = tqdm(range(1, epochs + 1), desc="finetune", unit="epoch") if progress else range(1, epochs + 1)
    for epoch in bar:
        scale = 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))  # cosine decay per epoch
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * scale
        train_loss, train_acc = _train_epoch(model, loader, optimizer, freeze_backbone, ev["device"])
        val_acc = None
        if val_ds is not None:
            y, pred = _predict(model, val_ds, ev["device"], ev["batch_size"], ev["num_workers"])
            val_acc = float(np.mean(y == pred))
        history.append({"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc, "val_accuracy": val_acc,
                        "lr": optimizer.param_groups[0]["lr"]})
        score = val_acc if val_acc is not None else -train_loss
        if not best.best_state or score > best.best_score:
            best.best_epoch, best.best_score, bad_epochs = epoch, score, 0
            best.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            save_best(epoch, val_acc, best.best_state)
        else:
            bad_epochs += 1
        if progress:
            bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_acc:.3f}" if val_acc is not None else "-")
        if val_ds is not None and bad_epochs >= patience:
            break
    if progress:
        bar.close()
    return best


def _train_epoch(model: Classifier, loader: DataLoader, optimizer: torch.optim.Optimizer, freeze_backbone: bool,
                 device: torch.device) -> tuple[float, float]:
    """One pass of cross-entropy training; returns (mean loss, accuracy) over its images."""
    model.train()
    if freeze_backbone:
        model.backbone.eval()  # frozen BN statistics too
    loss_fn = nn.CrossEntropyLoss()
    tot_loss, tot_n, tot_hit = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True).float(), torch.as_tensor(y).to(device)
        logits = model(x)
        loss = loss_fn(logits, y)
        if not torch.isfinite(loss):
            raise DataError("fine-tuning loss became non-finite: lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tot_loss += float(loss.detach()) * len(y)
        tot_n += len(y)
        tot_hit += int((logits.argmax(1) == y).sum())
    return tot_loss / max(1, tot_n), tot_hit / max(1, tot_n)


def _calibrate_unsure(model: Classifier, best_path: Path, base: Any, train_ds: Dataset, val_ds: Dataset | None,
                      ev: dict) -> dict:
    """``best.pt`` with the ``unsure`` thresholds for ``cellssl predict`` (calibrated on the validation
    cells; the training cells without a split) and the training images' size, no longer marked
    ``incomplete``; the caller writes it when the run's report is written."""
    l_tr, f_tr, y_tr = logits_and_features(model, train_ds, ev["device"], ev["batch_size"], ev["num_workers"])
    if val_ds is not None:
        l_va, f_va, y_va = logits_and_features(model, val_ds, ev["device"], ev["batch_size"], ev["num_workers"])
    else:
        l_va, f_va, y_va = np.zeros((0, len(base.classes))), np.zeros((0, f_tr.shape[1])), np.zeros(0, np.int64)
    best_ckpt = torch.load(best_path, map_location="cpu", weights_only=True)
    best_ckpt["unsure"] = calibrate(softmax(l_va) if len(l_va) else l_va, y_va, f_tr, y_tr, f_va,
                                    train_proba=softmax(l_tr))
    best_ckpt["native_size"] = native_size(base)
    best_ckpt.pop("incomplete", None)
    return best_ckpt


def _report(model: Classifier, fitted: _Fitted, classes: list[str], val_ds: Dataset | None, test_ds: Dataset | None,
            ev: dict, epochs: int) -> dict:
    """The report's training history and the best model's validation and test metrics."""
    report: dict = {"kind": "finetune", "classes": list(classes), "history": fitted.history,
                    "best_epoch": fitted.best_epoch,
                    "best_val_accuracy": fitted.best_score if val_ds is not None else None,
                    "stopped_early": len(fitted.history) < epochs}
    for key, ds in (("validation", val_ds), ("test", test_ds)):
        if ds is not None:
            y, pred = _predict(model, ds, ev["device"], ev["batch_size"], ev["num_workers"])
            report[key] = classification_metrics(y, pred, classes)
    if test_ds is not None:
        report.update({k: report["test"][k] for k in ("accuracy", "balanced_accuracy", "macro_f1")})
    return report
