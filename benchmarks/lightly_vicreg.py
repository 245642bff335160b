"""lightly's VICReg beside cellssl at the same minutes: the held-out check of issue 20.

The project does not depend on lightly; this benchmark puts it in a throwaway folder
(``--install DIR`` runs ``pip install --no-deps --target DIR lightly==1.6.0 lightning_utilities``;
torch, torchvision and PIL come from cellssl's environment) and reads it from there (``--lightly DIR``).

What it trains is lightly's own VICReg example (docs and ``examples/pytorch/vicreg.py`` of lightly
1.6.0), as a new user of lightly would run it on the same cells and machine:

* backbone: the resnet18 cellssl trains (timm, 512-d pooled features, built by cellssl's
  ``build_backbone`` from the ``blood_smear`` recipe), so the evaluation below reads it unchanged;
* head and loss: ``BarlowTwinsProjectionHead(512, 2048, 2048)``, ``VICRegLoss()`` (λ = μ = 25, ν = 1);
* views: ``VICRegTransform(input_size=64)`` (lightly's defaults: random resized crop 0.08-1, colour
  jitter 0.8, greyscale 0.2, solarise 0.1, blur 0.5, horizontal flip, ImageNet normalisation);
* optimiser: SGD at lr 0.06 (the example's), batch 128 (2 × 128 image-views a step, VICReg's shape
  in ``benchmarks/quality.py``), for ``--minutes`` of wall-clock (data loader start included).

The trained backbone is written as a cellssl checkpoint (ImageNet mean/std in its recipe, as it was
trained) and evaluated with the code of ``benchmarks/quality.py`` (``benchmarks.common.evaluate``):
PBC test 8-way 1/5/10-shot, linear and kNN probes on the same split, jtsc128 4-way few-shot and the
PBC→jtsc128 zero-label probe. Run it alone on the machine, on the same day as the quality benchmark
whose rows it is compared with::

    python -m benchmarks.lightly_vicreg --install /tmp/lightly_site           # once, throwaway
    python -m benchmarks.lightly_vicreg --lightly /tmp/lightly_site --minutes 20 --seeds 2 \\
        --work /tmp/lightly_runs --store /tmp/lightly_runs/results.json

A seed that finished is kept in ``--store`` and skipped on a rerun; a killed seed is trained again
from the start (a wall-clock budget cannot be resumed fairly).
"""

from __future__ import annotations

import argparse
import json
import site
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import (
    DEFAULT_CROSS_LAB,
    DEFAULT_PBC,
    SPLIT_SUFFIXES,
    command_line,
    evaluate,
    features_for,
    machine_line,
    make_split,
    require_folder,
    seed_table,
    summarise,
    table,
)
from cellssl.config import TTA_CHOICES

LIGHTLY = "lightly==1.6.0"
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
ROW = "lightly 1.6.0 VICReg (its example)"


def install(folder: Path) -> None:
    """Put lightly (and the one module its ``transforms`` import besides torch) into ``folder``."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder), LIGHTLY,
           "lightning_utilities"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode:
        last = (res.stderr.strip().splitlines() or ["pip failed"])[-1]
        sys.exit(f"error: could not install {LIGHTLY} into {folder}: {last}")
    print(f"{LIGHTLY} is in {folder}; run with --lightly {folder}")


def import_lightly(folder: str | None):
    """(VICRegLoss, BarlowTwinsProjectionHead, VICRegTransform) from lightly in ``folder``; a one-line
    exit naming the install command when it is not there."""
    if folder:
        site.addsitedir(str(folder))  # the --target folder of --install, as a site directory (not the project's)
    try:
        from lightly.loss import VICRegLoss
        from lightly.models.modules import BarlowTwinsProjectionHead
        from lightly.transforms import VICRegTransform
    except ImportError as exc:
        where = folder or "this environment"
        sys.exit(f"error: lightly is not importable from {where} ({exc}); run "
                 f"`python -m benchmarks.lightly_vicreg --install DIR` once, then pass --lightly DIR")
    return VICRegLoss, BarlowTwinsProjectionHead, VICRegTransform


class ImageFiles:
    """The images of a class-folder tree (labels unused), each read as RGB and passed to ``transform``
    (lightly's multi-view transform: a list of views). Picklable, for spawned loader workers."""

    def __init__(self, root: Path, transform) -> None:
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in SPLIT_SUFFIXES)
        if not self.files:
            sys.exit(f"error: no images under {root}; pass --data (a folder with one sub-folder per class)")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB"))


def eval_recipe(image_size: int):
    """The ``blood_smear`` recipe with VICReg and the ImageNet normalisation lightly trained with: what
    the checkpoint records, so the evaluation reads the images as training did."""
    import cellssl.methods  # noqa: F401  (registers the methods a recipe names)
    from cellssl.config import load_recipe

    return load_recipe("blood_smear", ["method.name=vicreg", f"data.image_size={image_size}",
                                       f"data.mean={IMAGENET['mean']}", f"data.std={IMAGENET['std']}"])


def backbone_checkpoint(backbone, recipe, step: int, path: Path) -> Path:
    """Write ``backbone`` as a cellssl checkpoint (format tag, recipe, ``backbone.*`` weights) that
    ``FeatureExtractor`` and every evaluation command read."""
    from cellssl.config import recipe_to_dict
    from cellssl.engine.checkpoint import FORMAT, save_atomic

    state = {f"backbone.{k}": v.detach().cpu() for k, v in backbone.state_dict().items()}
    ckpt = {"format": FORMAT, "step": step, "method": "lightly-vicreg", "in_chans": 3,
            "config": recipe_to_dict(recipe), "model": state}
    return save_atomic(ckpt, path)


def train(seed: int, args, out: Path) -> tuple[Path, dict]:
    """lightly's VICReg for ``args.minutes`` of wall-clock; returns (checkpoint, steps and speed)."""
    import torch
    from torch.utils.data import DataLoader

    from cellssl.models import build_backbone

    VICRegLoss, Head, VICRegTransform = import_lightly(args.lightly)
    torch.manual_seed(seed)
    recipe = eval_recipe(args.image_size)
    backbone = build_backbone(recipe.model, 3, args.image_size)
    head = Head(backbone.num_features, 2048, 2048)
    model = torch.nn.Sequential(backbone, head)
    criterion = VICRegLoss()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    data = ImageFiles(args.parts["pretrain"], VICRegTransform(input_size=args.image_size))
    # spawned workers: no forked child of this threaded process (DEVELOPERS.md); a stuck worker times out
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
                        multiprocessing_context="spawn" if args.workers else None,
                        persistent_workers=args.workers > 0, timeout=300 if args.workers else 0,
                        generator=torch.Generator().manual_seed(seed))
    model.train()
    t0, step, budget = time.monotonic(), 0, args.minutes * 60
    while time.monotonic() - t0 < budget:
        for views in loader:
            x0, x1 = views[0], views[1]
            loss = criterion(model(x0), model(x1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 20 == 0:
                print(f"seed {seed} step {step} loss {loss.item():.3f} {(time.monotonic() - t0) / 60:.1f} min",
                      flush=True)
            if time.monotonic() - t0 >= budget:
                break
    seconds = time.monotonic() - t0
    ckpt = backbone_checkpoint(backbone, recipe, step, out / "last.pt")
    views = step * args.batch_size * 2
    return ckpt, {"steps": step, "minutes": seconds / 60, "batch": args.batch_size, "n_views": 2,
                  "image_views": views, "views_per_s": views / max(seconds, 1e-9)}


def trained(seed: int, args, out: Path) -> tuple[Path, dict]:
    """The checkpoint and info of a finished run in ``out`` (another evaluation of the same training),
    else :func:`train` (from the start: a wall-clock budget cannot be resumed fairly)."""
    done = out / "train.json"
    if done.is_file() and (out / "last.pt").is_file():
        return out / "last.pt", json.loads(done.read_text())
    ckpt, info = train(seed, args, out)
    done.write_text(json.dumps(info))
    return ckpt, info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--install", default=None, metavar="DIR", help=f"pip install {LIGHTLY} into DIR and stop")
    ap.add_argument("--lightly", default=None, metavar="DIR", help="the folder --install filled")
    ap.add_argument("--data", default=str(DEFAULT_PBC))
    ap.add_argument("--cross-lab", default=str(DEFAULT_CROSS_LAB))
    ap.add_argument("--work", default="runs/lightly_vicreg")
    ap.add_argument("--store", default=None, help="JSON of finished seeds (default WORK/results.json)")
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.06, help="lightly's example: 0.06")
    ap.add_argument("--momentum", type=float, default=0.0, help="lightly's example: plain SGD")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--probe-max", type=int, default=None)
    ap.add_argument("--tta", choices=TTA_CHOICES, default="auto",
                    help="features averaged over each image's 8 rotations and flips (auto: as the quality "
                         "benchmark's rows, dihedral); none = plain features (results before 2026-12-02)")
    args = ap.parse_args(argv)
    args.cross_lab = None if str(args.cross_lab).lower() == "none" else args.cross_lab
    args.eval_on, args.device = "test", "cpu"  # what benchmarks.common.features_for reads, as quality's rows
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.install:
        install(Path(args.install))
        return
    import_lightly(args.lightly)  # fail in one line before any work
    require_folder(args.data, "PBC data")
    if args.cross_lab:
        require_folder(args.cross_lab, "cross-lab data", "pass --cross-lab DIR or --cross-lab none")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.parts = make_split(Path(args.data), work / "split")
    store_path = Path(args.store or work / "results.json")
    store = json.loads(store_path.read_text()) if store_path.exists() else {}
    train_key = f"{args.minutes:g}min-lr{args.lr:g}-m{args.momentum:g}-b{args.batch_size}-{args.image_size}px"
    key = train_key + ("" if args.tta == "none" else f"-tta-{args.tta}")  # plain features: the earlier key
    done = store.setdefault(key, {})
    print(f"{command_line('lightly_vicreg', argv)}\n{machine_line()}", flush=True)
    for seed in range(args.seeds):
        if str(seed) in done:
            continue
        ckpt, info = trained(seed, args, work / f"{train_key}-s{seed}")
        train_fs, test_fs, target_fs = features_for(str(ckpt), args.parts, args)
        row = {**evaluate(train_fs, test_fs, args.episodes, target_fs), **info}
        done[str(seed)] = row
        store_path.write_text(json.dumps(store, indent=1))
        print(f"seed {seed}: {json.dumps(row)}", flush=True)
    results = {ROW: summarise([done[s] for s in sorted(done, key=int)])}
    print("\n".join(table(results) + [""] + seed_table(results)))


if __name__ == "__main__":
    main()
