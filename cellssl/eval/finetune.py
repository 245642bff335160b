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
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from tqdm.auto import tqdm

from cellssl.augment.views import build_eval_transform, build_view_transform
from cellssl.data.datasets import TransformedDataset, split_indices
from cellssl.engine.checkpoint import FORMAT, save_atomic
from cellssl.errors import DataError
from cellssl.eval.features import FeatureExtractor, class_lut
from cellssl.eval.metrics import classification_metrics
from cellssl.eval.report import write_report
from cellssl.eval.unsure import calibrate, native_size

__all__ = ["finetune", "Classifier", "select_low_label", "logits_and_features", "softmax"]


class Classifier(nn.Module):
    """``backbone`` (B, C, S, S) -> (B, F) followed by ``head`` = Linear(F, K) -> logits (B, K).

    ``normalize=True`` L2-normalises the features before the head (a linear probe's folded form,
    :meth:`cellssl.eval.linear.ProbeFit.folded`).
    """
    def __init__(self, backbone: nn.Module, n_features: int, n_classes: int, normalize: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(n_features, n_classes)
        self.normalize = bool(normalize)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, F)."""
        f = self.backbone(x)
        return f.flatten(1) if f.ndim != 2 else f

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        """Features (B, F) -> logits (B, K)."""
        return self.head(nn.functional.normalize(f, dim=1) if self.normalize else f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


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


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise ``exp(l - max) / sum exp(l - max)``: (N, K) -> (N, K)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


class _FirstView:
    """Wraps a multi-view transform: image -> its first augmented view (C, S, S)."""

    def __init__(self, transform: Any):
        self.transform = transform

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        return self.transform(img)["views"][0]


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


def _predict(model: nn.Module, ds: Dataset, device: torch.device, batch_size: int, num_workers: int) -> tuple[np.ndarray, np.ndarray]:
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
) -> dict:
    """Fine-tune ``checkpoint`` + a linear head on the labelled folder ``data``.

    Splits: the test set is the folder ``test``, or a stratified ``split`` fraction of ``data``
    (``seed``), or none. Of the rest, a stratified ``val_fraction`` validates (early stopping);
    with ``labels_per_class`` K only K random images per class train (the low-label setting) and
    validation comes from the remaining images. ``lr`` sets the head's learning rate (backbone:
    ``lr / 10``); default 1e-3 / 1e-4. Stops after ``patience`` epochs without a better
    validation accuracy; the best model goes to ``out_dir/best.pt`` and is evaluated on the test set.

    Returns the report (also written to ``out_dir/report.json`` + ``report.md`` + confusion plot):
    ``history`` [{epoch, train_loss, train_accuracy, val_accuracy, lr}], ``best_epoch``,
    ``best_val_accuracy``, ``validation`` and ``test`` metrics (accuracy, balanced_accuracy,
    macro_f1, confusion_matrix, per_class_accuracy), ``classes``, ``settings``, ``checkpoint``.
    """
    out_dir = Path(out_dir)
    if out_dir.suffix == ".json":
        out_dir = out_dir.parent
    if epochs < 1:
        raise DataError(f"--epochs must be at least 1, got {epochs}")
    torch.manual_seed(seed)
    ex = FeatureExtractor(checkpoint, image_size=image_size, batch_size=batch_size, device=device, seed=seed,
                          num_workers=num_workers, progress=progress)
    dev = ex.device
    base, _ = ex.build(data, labelled=True)
    ex.prepare(base.channels)  # loads the backbone for these channels (one code path for random: and checkpoints)
    backbone = ex.backbone
    classes = list(base.classes)
    labels = base.labels
    data_cfg = ex.data_cfg
    channels = base.channels

    # --- splits ---------------------------------------------------------------------------
    test_ds: Dataset | None = None
    pool = np.arange(len(labels))
    eval_t = build_eval_transform(data_cfg, channels)
    if test is not None:
        tbase, _ = ex.build(test, labelled=True)
        if tbase.channels != channels:
            raise DataError(f"test folder {test} has {tbase.channels}-channel images but {data} has {channels}")
        test_ds = _Relabel(TransformedDataset(tbase, eval_t), class_lut(tbase.classes, tbase.labels, classes, f"the test folder {test}"))
    elif split is not None:
        if not 0 < split < 1:
            raise DataError(f"--split must be a fraction between 0 and 1 (e.g. 0.3), got {split}")
        rest, held = split_indices(labels, (1 - split, split), seed=seed, stratified=True)
        pool = rest
        test_ds = TransformedDataset(base, eval_t, held)
    if labels_per_class:
        tr_rel, va_rel = select_low_label(labels[pool], int(labels_per_class), val_fraction, seed, classes)
        train_idx, val_idx = pool[tr_rel], pool[va_rel]
    elif val_fraction and val_fraction > 0:
        tr_rel, va_rel = split_indices(labels[pool], (1 - val_fraction, val_fraction), seed=seed, stratified=True)
        train_idx, val_idx = pool[tr_rel], pool[va_rel]
    else:
        train_idx, val_idx = pool, np.zeros(0, dtype=np.int64)
    if len(train_idx) < 2 or len(np.unique(labels[train_idx])) < 2:
        raise DataError(f"fine-tuning needs at least 2 training images of 2 classes in {data}; got {len(train_idx)}")

    recipe = ex.recipe
    views_cfg = dataclasses.replace(recipe.views, n_views=2, local_views=0)
    train_t = _FirstView(build_view_transform(views_cfg, data_cfg, channels, seed=seed))
    train_ds = TransformedDataset(base, train_t, train_idx)
    val_ds = TransformedDataset(base, eval_t, val_idx) if len(val_idx) else None

    counts = np.bincount(labels[train_idx], minlength=len(classes)).astype(np.float64)
    weights = 1.0 / counts[labels[train_idx]]
    gen = torch.Generator().manual_seed(seed)
    sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples=len(train_idx),
                                    replacement=True, generator=gen)
    drop_last = len(train_idx) > batch_size and len(train_idx) % batch_size == 1
    loader = DataLoader(train_ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        drop_last=drop_last, pin_memory=dev.type == "cuda", persistent_workers=num_workers > 0)

    # --- model ----------------------------------------------------------------------------
    n_feat = getattr(backbone, "num_features", None)
    if not n_feat:
        with torch.no_grad():
            s = int(data_cfg.image_size)
            n_feat = int(backbone(torch.zeros(1, channels, s, s, device=dev)).shape[1])
    model = Classifier(backbone, int(n_feat), len(classes)).to(dev)
    head_lr = float(lr) if lr is not None else 1e-3
    bb_lr = head_lr / 10.0
    if freeze_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        groups = [{"params": model.head.parameters(), "lr": head_lr}]
    else:
        groups = [{"params": model.head.parameters(), "lr": head_lr},
                  {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": bb_lr}]
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()

    saved_config = copy.deepcopy(ex.info["config"])
    saved_config.setdefault("data", {})["image_size"] = int(data_cfg.image_size)
    history: list[dict] = []
    best_acc, best_epoch, best_state = -1.0, 0, None
    bad_epochs = 0
    best_path = out_dir / "best.pt"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    bar: Any = range(1, epochs + 1)
    if progress:

        bar = tqdm(bar, desc="finetune", unit="epoch")
    for epoch in bar:
        scale = 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))  # cosine decay per epoch
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * scale
        model.train()
        if freeze_backbone:
            model.backbone.eval()  # frozen BN statistics too
        tot_loss, tot_n, tot_hit = 0.0, 0, 0
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True).float(), torch.as_tensor(y).to(dev)
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
        val_acc = None
        if val_ds is not None:
            yv, pv = _predict(model, val_ds, dev, max(batch_size, 128), num_workers)
            val_acc = float(np.mean(yv == pv))
        rec = {"epoch": epoch, "train_loss": tot_loss / max(1, tot_n), "train_accuracy": tot_hit / max(1, tot_n),
               "val_accuracy": val_acc, "lr": head_lr * scale}
        history.append(rec)
        score = val_acc if val_acc is not None else -rec["train_loss"]
        if best_state is None or score > best_acc:
            best_acc, best_epoch, bad_epochs = score, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            save_atomic({
                "format": FORMAT,
                "kind": "finetune",
                "method": "finetune",
                "step": epoch,
                "epoch": epoch,
                "config": saved_config,
                "in_chans": int(channels),
                "classes": classes,
                "val_accuracy": val_acc,
                "source": str(checkpoint),
                "model": best_state,
            }, best_path)
        else:
            bad_epochs += 1
        if progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", val=f"{val_acc:.3f}" if val_acc is not None else "-")
        if val_ds is not None and bad_epochs >= patience:
            break
    if progress and hasattr(bar, "close"):
        bar.close()

    model.load_state_dict(best_state)
    # unsure thresholds for `cellssl predict`, on the validation cells (the training cells without a split)

    ev_bs = max(batch_size, 128)
    l_tr, f_tr, y_tr = logits_and_features(model, TransformedDataset(base, eval_t, train_idx), dev, ev_bs,
                                           num_workers)
    if val_ds is not None:
        l_va, f_va, y_va = logits_and_features(model, val_ds, dev, ev_bs, num_workers)
    else:
        l_va, f_va, y_va = np.zeros((0, len(classes))), np.zeros((0, f_tr.shape[1])), np.zeros(0, np.int64)
    best_ckpt = torch.load(best_path, map_location="cpu", weights_only=True)
    best_ckpt["unsure"] = calibrate(softmax(l_va) if len(l_va) else l_va, y_va, f_tr, y_tr, f_va,
                                    train_proba=softmax(l_tr))
    best_ckpt["native_size"] = native_size(base)
    save_atomic(best_ckpt, best_path)
    report: dict = {"kind": "finetune", "classes": classes, "history": history, "best_epoch": best_epoch,
                    "best_val_accuracy": best_acc if val_ds is not None else None,
                    "best_checkpoint": str(best_path), "stopped_early": len(history) < epochs}
    if val_ds is not None:
        yv, pv = _predict(model, val_ds, dev, max(batch_size, 128), num_workers)
        report["validation"] = classification_metrics(yv, pv, classes)
    if test_ds is not None:
        yt, pt = _predict(model, test_ds, dev, max(batch_size, 128), num_workers)
        report["test"] = classification_metrics(yt, pt, classes)
        report.update({k: report["test"][k] for k in ("accuracy", "balanced_accuracy", "macro_f1")})
    desc = ex.describe(data)
    desc["test_data"] = str(test) if test is not None else (f"{split:g} stratified split of {data} (seed {seed})" if split else None)
    report["checkpoint"] = desc
    report["settings"] = {
        "epochs": epochs, "epochs_run": len(history), "patience": patience, "labels_per_class": labels_per_class,
        "freeze_backbone": freeze_backbone, "head_lr": head_lr, "backbone_lr": None if freeze_backbone else bb_lr,
        "weight_decay": weight_decay, "batch_size": batch_size, "val_fraction": val_fraction, "split": split,
        "seed": seed, "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
        "n_test": int(len(test_ds)) if test_ds is not None else 0, "image_size": int(data_cfg.image_size),
        "augmentation": "first view of the recipe's multi-view transform", "sampling": "class-balanced",
        "minutes": round((time.monotonic() - t0) / 60, 2),
    }
    write_report(report, out_dir / "report.json", "finetune")
    return report
