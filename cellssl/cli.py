"""The ``cellssl`` command line: parse, load a recipe, call one function.

Every user-caused error is one line on stderr and exit code 2; ``--debug`` shows the traceback.
Each command imports its module inside the command (start-up time: ``cellssl --help`` and a bad
option answer without loading torch).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

import click

from cellssl.apply.settings import DEFAULT_BUDGET, DEFAULT_N_CLASSES, EXPORT_FORMATS, STRATEGIES
from cellssl.config import OPTIONS, TTA_CHOICES, EvalConfig, parse_value, value_range, value_type
from cellssl.errors import CellSSLError, ConfigError, did_you_mean
from cellssl.eval.settings import (
    DEFAULT_OOD_QUANTILE,
    DEFAULT_PART_ROWS,
    DEFAULT_TARGET_ERROR,
    EMBED_FORMATS,
    FEWSHOT_CLASSIFIERS,
    PREDICT_FORMATS,
)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EVAL = EvalConfig()  # a recipe's evaluation defaults: the evaluation options default to them


class RecipeValue(click.ParamType):
    """An option checked exactly like the recipe value ``key`` (``train.max_steps``) or the
    ``cellssl.config.OPTIONS`` entry ``key``: same type, finite, in the same range. A bad value is
    a one-line ``error:`` (exit 2) naming the option, the recipe key and the allowed range.
    ``allow``: words that mean "not set" (``all`` for ``--ways``), converted to None."""

    def __init__(self, key: str, allow: tuple[str, ...] = ()):
        self.key, self.allow = key, allow
        self.name = "float" if value_type(key, element=True) is float else "integer"

    def get_metavar(self, param, ctx=None) -> str:  # shown in --help: the type and the allowed range
        rng = value_range(self.key)
        return " | ".join([f"{self.name.upper()}{f' ({rng.describe()})' if rng else ''}", *self.allow])

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() in self.allow:
            return None
        opt = param.opts[0] if param is not None else self.key
        label = opt if self.key in OPTIONS else f"{opt} ({self.key})"
        try:
            return parse_value(self.key, value, label)
        except ConfigError:
            if not self.allow:
                raise
            words = " or ".join(repr(a) for a in self.allow)
            raise ConfigError(f"{label} must be {words} or a whole number {value_range(self.key).describe()}, "
                              f"got {value!r}") from None


class OneOf(click.ParamType):
    """A word from ``choices`` (case-insensitive); anything else is a one-line ``error:`` (exit 2)
    naming the option, the choices and the closest one (click.Choice would print a usage block)."""

    name = "choice"

    def __init__(self, *choices: str):
        self.choices = choices

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(self.choices) + "]"

    def convert(self, value, param, ctx):
        word = str(value).strip().lower()
        if word in self.choices:
            return word
        opt = param.opts[0] if param is not None else "the value"
        raise ConfigError(f"{opt} must be one of {', '.join(self.choices)}, got {value!r}"
                          f"{did_you_mean(word, self.choices)}")


# ---- shared options ----------------------------------------------------------------------
def _recipe_options(f):
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a recipe value, e.g. --set method.sv_weight=0.2 (repeatable).")(f)
    f = click.option("--overlay", "overlays", multiple=True, metavar="YAML",
                     help="Merge another YAML on top of the recipe (e.g. recipes/ablation/centroid.yaml).")(f)
    f = click.option("--recipe", default="blood_smear", show_default=True,
                     help="Recipe name from recipes/ (`cellssl list recipes`) or a path to a YAML file.")(f)
    return f


def _eval_options(f):
    f = click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")(f)
    f = click.option("--batch-size", type=RecipeValue("eval.batch_size"), default=EVAL.batch_size, show_default=True,
                     help="Feature extraction batch.")(f)
    f = click.option("--image-size", type=RecipeValue("data.image_size"), default=None,
                     help="Input size (default: the checkpoint's).")(f)
    f = click.option("--adapt-bn", type=click.Path(), default=None,
                     help="Re-estimate BatchNorm statistics on this folder first (AdaBN).")(f)
    f = click.option("--tta", type=click.Choice(TTA_CHOICES), default=None,
                     help="Average each image's features over its 8 rotations and flips (dihedral; 8x the "
                          "passes) or not (none). Default: the checkpoint recipe's eval.tta (auto: dihedral "
                          "when its views rotate and flip).")(f)
    f = click.option("--checkpoint", required=True,
                     help="A checkpoint from `cellssl pretrain`; baselines: random:<timm name> (random init), "
                          "pixels:<side> (raw pixels, e.g. pixels:16), or pretrained:<timm tag | exported folder | "
                          "NAME=FILE> for published starting weights.")(f)
    return f


def _flag_overrides(**flags) -> list[str]:
    """Turn CLI flags into recipe overrides (``None`` = not given)."""
    mapping = {
        "data": "data.path", "out": "train.out", "device": "train.device", "max_steps": "train.max_steps",
        "epochs": "train.epochs", "max_minutes": "train.max_minutes", "batch_size": "train.batch_size",
        "image_size": "data.image_size", "backbone": "model.backbone", "seed": "train.seed",
        "checkpoint_every": "train.checkpoint_every", "method": "method.name", "workers": "data.num_workers",
    }
    return [f"{mapping[k]}={v}" for k, v in flags.items() if v is not None]


def _print_summary(report: dict) -> None:
    from cellssl.eval.report import format_summary

    click.echo(format_summary(report))


# ---- the group ---------------------------------------------------------------------------
@click.group(context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors (read by main).")
@click.version_option(package_name="cellssl")
def cli(debug: bool) -> None:
    """cellssl: self-supervised representation learning for cell images (MSBReg), few-shot
    evaluation, and adaptation to a new lab.

    \b
    Start here:
      cellssl demo                                  # synthetic smears: pretrain + few-shot report
      cellssl pretrain --recipe blood_smear --data DIR
      cellssl fewshot --checkpoint RUN/checkpoints/last.pt --data LABELLED_DIR --out report.json
      cellssl linear --checkpoint RUN/checkpoints/last.pt --train LABELLED_DIR --split 0.2 --out eval/
      cellssl predict --model eval/classifier.pt --data NEW_CELLS --out predictions/
      cellssl export --checkpoint RUN/checkpoints/last.pt --out model/
    """


@cli.command(context_settings=CONTEXT)
@_recipe_options
@click.option("--data", type=click.Path(), default=None, help="Image folder (default: the recipe's, else synthetic).")
@click.option("--out", type=click.Path(), default=None, help="Run folder (default: runs/<recipe>-<time>).")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N")
@click.option("--max-steps", type=RecipeValue("train.max_steps"), default=None)
@click.option("--epochs", type=RecipeValue("train.epochs"), default=None)
@click.option("--max-minutes", type=RecipeValue("train.max_minutes"), default=None,
              help="Wall-clock budget: the first steps are timed, then the whole schedule (warm-up, cosine LR, "
                   "EMA) is sized to the steps that fit, so the run anneals and ends on time; --resume keeps it.")
@click.option("--batch-size", type=RecipeValue("train.batch_size"), default=None, help="Per-process batch size.")
@click.option("--image-size", type=RecipeValue("data.image_size"), default=None)
@click.option("--backbone", default=None, help="Any timm model name.")
@click.option("--method", default=None, help="Self-supervised method (`cellssl list methods`; default: the recipe's).")
@click.option("--seed", type=RecipeValue("train.seed"), default=None)
@click.option("--workers", type=RecipeValue("data.num_workers"), default=None, help="Data-loader worker processes.")
@click.option("--checkpoint-every", type=RecipeValue("train.checkpoint_every"), default=None)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/last.pt.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in --out (refused otherwise).")
def pretrain(recipe, overlays, overrides, resume, overwrite, **flags):
    """Self-supervised pretraining (MSBReg by default).

    Multi-GPU: torchrun --nproc_per_node N -m cellssl.cli pretrain ...
    """
    from cellssl.config import load_recipe
    from cellssl.engine.fit import fit
    from cellssl.engine.watchdog import exit_code_for, stopped_message
    from cellssl.eval.knn import knn_monitor

    given = list(overrides) + _flag_overrides(**flags)
    r = load_recipe(recipe, given, list(overlays))
    if resume and not r.train.out:
        raise CellSSLError("--resume needs --out (the run folder to continue)")
    if resume and overwrite:
        raise CellSSLError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    own = _resume_recipe(recipe, r.train.out) if resume else recipe
    if own != recipe:
        r = load_recipe(own, given, list(overlays))
    result = fit(r, resume=resume, overwrite=overwrite, knn_monitor=knn_monitor(r))
    note = f" (stopped early: {result.stopped_early})" if result.stopped_early else ""
    if result.skipped_steps:
        note += f" ({result.skipped_steps} step(s) skipped: non-finite loss)"
    click.echo(f"pretrained {result.step}/{result.total_steps} steps{note}; checkpoint: {result.checkpoint}")
    code = exit_code_for(result.stopped_early)
    if code:  # a stopped run is not a success: `pretrain && linear` must not go on
        click.echo(stopped_message(result.stopped_early, result.step, result.total_steps, result.checkpoint), err=True)
        sys.exit(code)


def _resume_recipe(recipe: str, out: str) -> str:
    """The recipe a ``--resume`` starts from: the run's own ``OUT/config.yaml`` unless ``--recipe`` is
    given (the options given now change it; an unchanged length continues the run exactly)."""
    ctx = click.get_current_context()
    given = ctx.get_parameter_source("recipe") not in (click.core.ParameterSource.DEFAULT, None)
    own = Path(out) / "config.yaml"
    return str(own) if not given and own.is_file() else recipe


@cli.command(context_settings=CONTEXT)
@_recipe_options
@click.option("--out", type=click.Path(), default="runs/demo", show_default=True)
@click.option("--data", type=click.Path(), default=None, help="Labelled folder (default: built-in synthetic smears).")
@click.option("--max-steps", type=RecipeValue("train.max_steps"), default=None)
@click.option("--device", default=None)
def demo(recipe, overlays, overrides, out, data, max_steps, device):
    """The main job end to end: pretrain MSBReg, then few-shot + linear evaluation with a report.

    Uses the cpu_demo recipe and the built-in synthetic blood-smear set unless told otherwise.
    """
    from cellssl.config import load_recipe
    from cellssl.demo import run_demo

    name = recipe if recipe != "blood_smear" or overlays or overrides else "cpu_demo"
    r = load_recipe(name, list(overrides) + _flag_overrides(data=data, max_steps=max_steps, device=device),
                    list(overlays))
    report_md = run_demo(r, Path(out))
    click.echo(f"report: {report_md}")


# ---- evaluation --------------------------------------------------------------------------
@cli.command(context_settings=CONTEXT)
@_eval_options
@click.option("--data", required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(),
              help="Output file (.npz, .h5ad, .parquet) or folder (embeddings.<format>).")
@click.option("--format", "fmt", type=OneOf("auto", *EMBED_FORMATS), default="auto",
              show_default=True, help="npz (cellssl), h5ad (AnnData/scanpy: obsm['X_cellssl']), parquet "
                                      "(pandas/Arrow); auto: from the --out suffix, else npz.")
@click.option("--lab", default=None, help="Lab / batch name written to the h5ad/parquet 'lab' column "
                                          "(default: the data folder's name).")
@click.option("--plot", is_flag=True, help="Also draw a 2-D map (UMAP, or t-SNE without umap-learn) coloured by "
                                           "class and by folder: <out stem>_map.png.")
@click.option("--um-per-px", type=RecipeValue("data.um_per_px"), default=None,
              help="Micrometres per pixel of --data: resampled to the checkpoint's data.um_per_px when it has one.")
@click.option("--part-rows", type=click.IntRange(1), default=DEFAULT_PART_ROWS, show_default=True,
              help="A larger set is embedded in parts of this many rows (OUT.parts/, one part in memory; any "
                   "format); a killed embed rerun with the same options continues after the last complete part.")
def embed(checkpoint, data, out, fmt, lab, plot, um_per_px, part_rows, image_size, batch_size, device, adapt_bn, tta):
    """Frozen backbone features of every image (no augmentation; averaged over its 8 rotations and flips
    unless --tta none) -> .npz (features, paths, labels), .h5ad (AnnData) or .parquet."""
    from cellssl.eval.tables import embed_outputs

    files = embed_outputs(checkpoint, data, out, fmt=fmt, lab=lab, plot=plot, part_rows=part_rows,
                          image_size=image_size, batch_size=batch_size, device=device, adapt_bn=adapt_bn,
                          um_per_px=um_per_px, tta=tta)
    click.echo(f"features written to {files['features']}")
    if "plot" in files:
        click.echo(f"map: {files['plot']}")


@cli.command(context_settings=CONTEXT)
@_eval_options
@click.option("--data", required=True, type=click.Path(), help="Labelled folder (one sub-folder per class).")
@click.option("--ways", type=RecipeValue("eval.ways", allow=("all",)), default=EVAL.ways or "all", show_default=True,
              help="N classes per episode, or 'all'.")
@click.option("--shots", type=RecipeValue("eval.shots"), multiple=True, default=tuple(EVAL.shots), show_default=True,
              help="K (repeatable).")
@click.option("--queries", type=RecipeValue("eval.queries"), default=EVAL.queries, show_default=True)
@click.option("--episodes", type=RecipeValue("eval.episodes"), default=EVAL.episodes, show_default=True)
@click.option("--classifier", type=click.Choice(FEWSHOT_CLASSIFIERS), default=FEWSHOT_CLASSIFIERS[0], show_default=True)
@click.option("--seed", type=RecipeValue("train.seed"), default=0)
@click.option("--out", required=True, type=click.Path(), help="report.json (report.md and plots go next to it)")
def fewshot(checkpoint, data, ways, shots, queries, episodes, classifier, seed, out, image_size, batch_size, device,
            adapt_bn, tta):
    """N-way K-shot episodes (SimpleShot or logistic regression): mean accuracy with 95% CI."""
    from cellssl.eval.fewshot import fewshot as run

    report = run(checkpoint, data, out, ways=ways, shots=tuple(shots), queries=queries, episodes=episodes,
                 classifier=classifier, seed=seed, image_size=image_size, batch_size=batch_size, device=device,
                 adapt_bn=adapt_bn, tta=tta)
    _print_summary(report)


@cli.command(context_settings=CONTEXT)
@_eval_options
@click.option("--train", "train_dir", required=True, type=click.Path())
@click.option("--test", "test_dir", default=None, type=click.Path(), help="Labelled test folder.")
@click.option("--split", type=RecipeValue("--split"), default=None,
              help="No --test: hold out this fraction of --train.")
@click.option("--seed", type=RecipeValue("train.seed"), default=0)
@click.option("--out", required=True, type=click.Path())
def linear(checkpoint, train_dir, test_dir, split, seed, out, image_size, batch_size, device, adapt_bn, tta):
    """Linear probe (logistic regression, C chosen on a validation split) on frozen features."""
    from cellssl.eval.linear import linear as run

    report = run(checkpoint, train_dir, test_dir, out, split=split, seed=seed, image_size=image_size,
                 batch_size=batch_size, device=device, adapt_bn=adapt_bn, tta=tta)
    _print_summary(report)


@cli.command(context_settings=CONTEXT)
@_eval_options
@click.option("--train", "train_dir", required=True, type=click.Path())
@click.option("--test", "test_dir", default=None, type=click.Path())
@click.option("--split", type=RecipeValue("--split"), default=None,
              help="No --test: hold out this fraction of --train.")
@click.option("--k", type=RecipeValue("eval.knn_k"), default=EVAL.knn_k, show_default=True)
@click.option("--temperature", type=RecipeValue("eval.knn_temperature"), default=EVAL.knn_temperature,
              show_default=True)
@click.option("--seed", type=RecipeValue("train.seed"), default=0)
@click.option("--out", required=True, type=click.Path())
def knn(checkpoint, train_dir, test_dir, split, k, temperature, seed, out, image_size, batch_size, device, adapt_bn,
        tta):
    """Weighted kNN classifier on frozen, L2-normalised features."""
    from cellssl.eval.knn import knn as run

    report = run(checkpoint, train_dir, test_dir, out, k=k, temperature=temperature, split=split, seed=seed,
                 image_size=image_size, batch_size=batch_size, device=device, adapt_bn=adapt_bn, tta=tta)
    _print_summary(report)


@cli.command(context_settings=CONTEXT)
@click.option("--checkpoint", required=True,
              help="A pretrain checkpoint, random:<timm name> or pretrained:<timm tag | exported folder | NAME=FILE>.")
@click.option("--data", required=True, type=click.Path(), help="The lab's labelled folder.")
@click.option("--out", required=True, type=click.Path(), help="Run folder (best.pt, report.json, report.md).")
@click.option("--test", "test_dir", default=None, type=click.Path())
@click.option("--val-fraction", type=RecipeValue("finetune --val-fraction"), default=0.2, show_default=True)
@click.option("--epochs", type=RecipeValue("train.epochs"), default=20, show_default=True)
@click.option("--labels-per-class", type=RecipeValue("finetune --labels-per-class"), default=None,
              help="Keep only K labelled images per class.")
@click.option("--freeze-backbone", is_flag=True)
@click.option("--lr", type=RecipeValue("optim.lr"), default=None)
@click.option("--batch-size", type=RecipeValue("train.batch_size"), default=64, show_default=True)
@click.option("--image-size", type=RecipeValue("data.image_size"), default=None)
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=RecipeValue("train.seed"), default=0)
@click.option("--overwrite", is_flag=True, help="Replace the finetune run already in --out (refused otherwise).")
def finetune(checkpoint, data, out, test_dir, val_fraction, epochs, labels_per_class, freeze_backbone, lr,
             batch_size, image_size, device, seed, overwrite):
    """Fine-tune on a lab's labelled folder (class-balanced, early stopping, best model saved)."""
    from cellssl.eval.finetune import finetune as run

    report = run(checkpoint, data, out, val_fraction=val_fraction, test=test_dir, epochs=epochs,
                 labels_per_class=labels_per_class, freeze_backbone=freeze_backbone, lr=lr, batch_size=batch_size,
                 device=device, seed=seed, image_size=image_size, overwrite=overwrite)
    _print_summary(report)


# ---- using a trained model ---------------------------------------------------------------
@cli.command(context_settings=CONTEXT)
@click.option("--model", "model", required=True, type=click.Path(),
              help="finetune's RUN/best.pt, or the classifier.pt that `cellssl linear` writes beside its report.")
@click.option("--data", required=True, type=click.Path(), help="Folder of images to classify (searched recursively).")
@click.option("--out", required=True, type=click.Path(),
              help="Folder for predictions.csv, report.md, least_certain.png.")
@click.option("--target-error", type=float, default=None,
              help="Error allowed among confident cells, on the validation cells "
                   f"(default: the model's, {DEFAULT_TARGET_ERROR:g}).")
@click.option("--ood-quantile", type=float, default=None,
              help="Flag cells farther from every class than this quantile of validation cells "
                   f"(default: the model's, {DEFAULT_OOD_QUANTILE:g}).")
@click.option("--sheet", type=int, default=48, show_default=True, help="Least certain cells in the contact sheet.")
@click.option("--batch-size", type=RecipeValue("eval.batch_size"), default=128, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--overwrite", is_flag=True, help="Replace an earlier prediction folder in --out as a whole.")
@click.option("--format", "fmt", type=OneOf(*PREDICT_FORMATS), default=PREDICT_FORMATS[0], show_default=True,
              help="parquet: also predictions.parquet (same columns, typed: probability/distance float, unsure bool).")
@click.option("--part-rows", type=click.IntRange(1), default=DEFAULT_PART_ROWS, show_default=True,
              help="A larger set is scored in parts of this many rows (OUT/predictions.parts/, one part in memory); "
                   "a killed predict rerun with the same model, data and --part-rows continues after the last "
                   "complete part.")
def predict(model, data, out, target_error, ood_quantile, sheet, batch_size, device, overwrite, fmt, part_rows):
    """Classify every image of a folder: predictions.csv, a differential count and the cells to check."""
    from cellssl.apply.predict import format_predict_summary
    from cellssl.apply.predict import predict as run

    if target_error is not None and not 0 < target_error < 1:
        raise CellSSLError(f"--target-error must be a fraction between 0 and 1 (e.g. 0.05), got {target_error}")
    if ood_quantile is not None and not 0 < ood_quantile <= 1:
        raise CellSSLError(f"--ood-quantile must be in (0, 1] (e.g. 0.99), got {ood_quantile}")
    if fmt == "parquet":
        from cellssl.eval.tables import check_writable

        check_writable(out)  # before any image is read (docs/reliability.md)
    report = run(model, data, out, target_error=target_error, ood_quantile=ood_quantile, sheet=sheet,
                 batch_size=batch_size, device=device, overwrite=overwrite, part_rows=part_rows, fmt=fmt)
    if "parquet" in report["files"]:
        click.echo(f"table: {report['files']['parquet']}")
    click.echo(format_predict_summary(report))


@cli.command(context_settings=CONTEXT)
@click.option("--checkpoint", required=True, type=click.Path(),
              help="RUN/checkpoints/last.pt (backbone), finetune's best.pt or linear's classifier.pt (with the head).")
@click.option("--out", required=True, type=click.Path(), help="Folder for the export.")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default=EXPORT_FORMATS[0], show_default=True,
              help="model.safetensors for timm, model.onnx (dynamic batch), or both.")
@click.option("--report", "reports", multiple=True, type=click.Path(),
              help="Evaluation report.json to quote in the model card (repeatable; reports beside the checkpoint "
                   "are found).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in --out as a whole (refused otherwise).")
def export(checkpoint, out, fmt, reports, overwrite):
    """Hand a model on: safetensors loadable by timm, ONNX, config.json with the preprocessing, a model card."""
    from cellssl.apply.export import export as run

    config = run(checkpoint, out, fmt=fmt, reports=list(reports), overwrite=overwrite)
    onnx = config["cellssl"]["onnx"]
    diff = f"; ONNX vs torch max abs difference {onnx['max_abs_diff_vs_torch']:.2e}" if onnx and \
        onnx.get("max_abs_diff_vs_torch") is not None else ""
    click.echo(f"exported {config['architecture']} ({', '.join(config['cellssl']['files'])}) to {out}{diff}")
    click.echo(f"model card: {Path(out) / 'README.md'}")


# ---- which cells to label ----------------------------------------------------------------
@cli.command("select", context_settings=CONTEXT)
@_eval_options
@click.option("--data", required=True, type=click.Path(), help="The unlabelled pool (folder or CSV manifest).")
@click.option("--budget", type=click.IntRange(min=1), default=DEFAULT_BUDGET, show_default=True,
              help="Cells to select.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=STRATEGIES[0], show_default=True,
              help="typiclust: typical cells of every region (best at small budgets).")
@click.option("--labelled", multiple=True, type=click.Path(),
              help="CSV (e.g. a filled-in to_label.csv) or folder of cells already labelled: the new cells "
                   "avoid what they cover (repeatable).")
@click.option("--features", type=click.Path(), default=None,
              help="Reuse the pool's embeddings.npz (from a previous select or `cellssl embed`).")
@click.option("--n-classes", type=click.IntRange(min=2), default=DEFAULT_N_CLASSES, show_default=True,
              help="Expected number of cell types (sets probcover's ball radius).")
@click.option("--link", is_flag=True, help="Symlink the selected images into OUT/images instead of copying them.")
@click.option("--no-map", is_flag=True, help="Skip the 2-D map of the pool in report.md (t-SNE: ~10-20 s).")
@click.option("--format", "fmt", type=OneOf("npz", "h5ad"), default="npz", show_default=True,
              help="h5ad: also the pool's embeddings as OUT/embeddings.h5ad (AnnData, obsm['X_cellssl']).")
@click.option("--seed", type=int, default=0)
@click.option("--out", required=True, type=click.Path(),
              help="Folder for to_label.csv, contact_sheet.png, images/, map.png, report.md.")
def select(checkpoint, data, budget, strategy, labelled, features, n_classes, link, no_map, fmt, seed, out, image_size,
           batch_size, device, adapt_bn, tta):
    """Which cells should the expert label first? Embed the pool and choose --budget cells.

    \b
    Loop: select -> label (fill in the 'label' column of OUT/to_label.csv, using the numbered
    OUT/contact_sheet.png) -> linear / knn / fewshot / finetune with the CSV as labelled data
    -> next round with --labelled OUT/to_label.csv.
    """
    from cellssl.apply.select import format_selection
    from cellssl.apply.select import select as run

    report = run(checkpoint, data, out, budget=budget, strategy=strategy, labelled=labelled, features=features,
                 seed=seed, n_classes=n_classes, link=link, image_size=image_size, batch_size=batch_size,
                 device=device, adapt_bn=adapt_bn, tta=tta, map_points=0 if no_map else 2000)
    click.echo(format_selection(report))
    if fmt == "h5ad":
        from cellssl.eval.tables import npz_to_h5ad

        h5ad = npz_to_h5ad(report["files"]["embeddings"], data, Path(out) / "embeddings.h5ad",
                           info={"spec": checkpoint})
        click.echo(f"embeddings: {h5ad}")


# ---- data --------------------------------------------------------------------------------
@cli.group(context_settings=CONTEXT)
def datasets():
    """Check, generate, download and shift datasets."""


@datasets.command("check", context_settings=CONTEXT)
@click.argument("folder", type=click.Path())
@click.option("--um-per-px", type=RecipeValue("data.um_per_px"), default=None,
              help="Micrometres per pixel of these images: the cell size is also given in µm.")
def datasets_check(folder, um_per_px):
    """Counts per class, sizes, channels, dtypes, the apparent cell size, duplicates and unreadable files
    (a shard folder: every shard's size and sha256 against its index)."""
    from cellssl.data.check import check_dataset, format_check_report
    from cellssl.data.shards import is_shard_folder, verify_shards

    if is_shard_folder(folder):
        problems, summary = verify_shards(folder)
        click.echo("\n".join([summary, *problems]))
        sys.exit(1 if problems else 0)
    report = check_dataset(folder, um_per_px=um_per_px)
    click.echo(format_check_report(report))
    if report.get("unreadable"):
        sys.exit(1)


@datasets.command("synth", context_settings=CONTEXT)
@click.option("--out", required=True, type=click.Path())
@click.option("--n", type=RecipeValue("data.synth_n"), default=800, show_default=True)
@click.option("--seed", type=RecipeValue("data.synth_seed"), default=0, show_default=True)
@click.option("--image-size", type=RecipeValue("data.image_size"), default=64, show_default=True)
def datasets_synth(out, n, seed, image_size):
    """Write the procedural (synthetic) blood-smear set: one folder per cell class."""
    from cellssl.data.synth import generate_dataset

    path = generate_dataset(out, n=n, seed=seed, image_size=image_size)
    click.echo(f"wrote {n} synthetic smear images to {path}")


@datasets.command("tile", context_settings=CONTEXT)
@click.argument("image", type=click.Path())
@click.option("--mask", type=click.Path(), default=None, help="Instance mask: one crop centred on each object.")
@click.option("--out", required=True, type=click.Path())
@click.option("--size", type=RecipeValue("datasets tile --size"), default=64, show_default=True)
def datasets_tile(image, mask, out, size):
    """Cut a large (e.g. 16-bit fluorescence) image into cell-centred or grid crops (TIFF)."""
    from cellssl.data.tiles import tile_image_to_folder

    paths = tile_image_to_folder(image, mask, out, size)
    click.echo(f"wrote {len(paths)} crops of {size} px to {out}")


@datasets.command("shard", context_settings=CONTEXT)
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--shard-size", type=RecipeValue("datasets shard --shard-size"), default=10000, show_default=True,
              help="Cells per tar shard.")
def datasets_shard(src, out, shard_size):
    """Write a folder, CSV manifest, .npz or tile set as tar shards with an index (for millions of
    cells): pixels lossless (any bit depth and channel count), labels and original paths kept."""
    from cellssl.config import DataConfig
    from cellssl.data.datasets import build_dataset
    from cellssl.data.shards import write_shards

    ds = build_dataset(DataConfig(), src)
    index = write_shards(ds, out, shard_size)
    skipped = f", {len(index['skipped'])} unreadable file(s) skipped (named above)" if index["skipped"] else ""
    click.echo(f"wrote {index['count']} cells in {len(index['shards'])} shard(s) to {out}{skipped}")


@datasets.command("download", context_settings=CONTEXT)
@click.argument("name", type=click.Choice(["pbc", "bloodmnist"]))
@click.option("--root", type=click.Path(), default="data", show_default=True)
def datasets_download(name, root):
    """Fetch a public dataset from its official source, verify it, unpack it."""
    from cellssl.data.download import download_dataset

    path = download_dataset(name, root)
    click.echo(f"{name} is in {path}")


@datasets.command("shift", context_settings=CONTEXT)
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--preset", default="scanner_b", show_default=True)
@click.option("--seed", type=RecipeValue("train.seed"), default=0)
def datasets_shift(src, out, preset, seed):
    """Make a domain-shifted copy of a folder (stain, blur, resolution, JPEG, illumination)."""
    from cellssl.adapt.shift import shift_folder

    n = shift_folder(src, out, preset=preset, seed=seed)
    click.echo(f"wrote {n} shifted images ({preset}) to {out}")


@cli.command(context_settings=CONTEXT)
@_recipe_options
@click.option("--data", type=click.Path(), default=None)
@click.option("--out", type=click.Path(), default="views.png", show_default=True,
              help="Image file (.png, .jpg, .pdf, .svg, ...; no suffix: .png is added).")
@click.option("--n", type=RecipeValue("views --n"), default=8, show_default=True, help="Images (rows).")
@click.option("--seed", type=RecipeValue("train.seed"), default=0)
def views(recipe, overlays, overrides, data, out, n, seed):
    """Save a grid of images and their M augmented views: see what the network sees."""
    import cellssl.methods  # noqa: F401  (registers the methods' settings, which the recipe is built from)
    from cellssl.augment.grid import grid_path, save_view_grid
    from cellssl.augment.views import build_view_transform
    from cellssl.config import load_recipe
    from cellssl.data.datasets import build_dataset

    out = grid_path(out)
    r = load_recipe(recipe, list(overrides) + _flag_overrides(data=data), list(overlays))
    ds = build_dataset(r.data, labelled=False)
    transform = build_view_transform(r.views, r.data, ds.channels)
    path = save_view_grid(ds, transform, r.data, out, n=n, seed=seed)
    click.echo(f"views written to {path}")


# ---- domain adaptation -------------------------------------------------------------------
@cli.command(context_settings=CONTEXT)
@click.option("--checkpoint", required=True, type=click.Path(),
              help="Source-lab checkpoint, or pretrained:<timm tag | exported folder> starting weights.")
@click.option("--data", required=True, type=click.Path(), help="Target lab's unlabelled images.")
@click.option("--out", required=True, type=click.Path())
@click.option("--max-steps", type=RecipeValue("train.max_steps"), default=None)
@click.option("--max-minutes", type=RecipeValue("train.max_minutes"), default=None)
@click.option("--method", default=None, help="Method for continued training (default: the checkpoint's).")
@click.option("--source", type=click.Path(), default=None, help="Mix in source images from this folder.")
@click.option("--source-fraction", type=RecipeValue("adapt.source_fraction"), default=None)
@click.option("--bn-only", is_flag=True, help="Only re-estimate BatchNorm statistics (AdaBN), seconds.")
@click.option("--resume", is_flag=True)
@click.option("--overwrite", is_flag=True, help="Replace the run already in --out (refused otherwise).")
@click.option("--device", default=None)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def adapt(checkpoint, data, out, max_steps, max_minutes, method, source, source_fraction, bn_only, resume, overwrite,
          device, overrides):
    """Carry a model to a new lab: continued SSL on its unlabelled images, or AdaBN (--bn-only)."""
    from cellssl.adapt.continued import adapt as run
    from cellssl.engine.watchdog import RunStopped

    if resume and overwrite:
        raise CellSSLError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    try:
        path = run(checkpoint, data, out, max_steps=max_steps, max_minutes=max_minutes, method=method, source=source,
                   source_fraction=source_fraction, bn_only=bn_only, resume=resume, device=device,
                   overrides=list(overrides), overwrite=overwrite)
    except RunStopped as stop:  # checkpoint written; not a finished adaptation
        click.echo(stop.message, err=True)
        sys.exit(stop.exit_code)
    click.echo(f"adapted checkpoint: {path}")


@cli.command("stain-normalize", context_settings=CONTEXT)
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--reference", required=True, type=click.Path(), help="Reference image or folder.")
@click.option("--method", type=click.Choice(["macenko", "reinhard"]), default="macenko", show_default=True)
def stain_normalize(src, out, reference, method):
    """Stain-normalise a folder of bright-field images to a reference (Macenko or Reinhard)."""
    from cellssl.data.stain import normalize_folder

    n = normalize_folder(src, out, reference, method=method)
    click.echo(f"wrote {n} normalised images to {out}")


@cli.command("transfer-report", context_settings=CONTEXT)
@click.option("--checkpoint", required=True, type=click.Path(), help="Source checkpoint.")
@click.option("--adapted", type=click.Path(), default=None, help="Checkpoint from `cellssl adapt`.")
@click.option("--source", required=True, type=click.Path(), help="Labelled source-lab folder.")
@click.option("--target", required=True, type=click.Path(), help="Labelled target-lab folder.")
@click.option("--out", required=True, type=click.Path())
@click.option("--episodes", type=RecipeValue("eval.episodes"), default=300, show_default=True)
@click.option("--stain-method", type=click.Choice(["macenko", "reinhard"]), default="macenko", show_default=True,
              help="Stain normalisation of the '+ stain normalisation' row.")
@click.option("--device", default="auto", show_default=True)
@click.option("--source-um-per-px", type=RecipeValue("data.um_per_px"), default=None,
              help="Micrometres per pixel of --source (with --target-um-per-px: adds a scale-matched row).")
@click.option("--target-um-per-px", type=RecipeValue("data.um_per_px"), default=None,
              help="Micrometres per pixel of --target: resampled to the source's scale in the scale-matched row.")
def transfer_report(checkpoint, adapted, source, target, out, episodes, stain_method, device, source_um_per_px,
                    target_um_per_px):
    """What each adaptation step buys on the target lab: few-shot and linear accuracy with CIs, and
    the lab effect (labs mixed within a cell type? types apart?) with a map per variant."""
    from cellssl.adapt.report import transfer_report as run

    if (source_um_per_px is None) != (target_um_per_px is None):
        raise CellSSLError("give both --source-um-per-px and --target-um-per-px (the scale of each folder), or neither")
    path = run(checkpoint, source, target, out, adapted=adapted, episodes=episodes, device=device,
               stain_method=stain_method, source_um_per_px=source_um_per_px, target_um_per_px=target_um_per_px)
    click.echo(f"transfer report: {path}")


# ---- listing -----------------------------------------------------------------------------
@cli.command("list", context_settings=CONTEXT)
@click.argument("what", type=click.Choice(["recipes", "backbones", "methods"]))
@click.option("--filter", "pattern", default="*", help="Glob for backbones, e.g. 'resnet*'.")
def list_(what, pattern):
    """List recipes, timm backbones or methods."""
    if what == "recipes":
        import cellssl.methods  # noqa: F401  (registers the methods' settings, which the recipes are built from)
        from cellssl.config import available_recipes, load_recipe

        for name in available_recipes():
            click.echo(f"{name:16s} {load_recipe(name).description}")
    elif what == "backbones":
        from cellssl.models import list_backbones

        click.echo("\n".join(list_backbones(pattern)))
    else:
        from cellssl.config import MethodConfig, method_settings, setting_lines
        from cellssl.methods import METHODS

        for name, cls in sorted(METHODS.items()):
            click.echo(f"{name:8s} {(cls.__doc__ or '').strip().splitlines()[0]}")
            for line in setting_lines(method_settings(name), own_only=True):
                click.echo(f"{'':8s}   {line}")
        with_target = ", ".join(name for name, cls in sorted(METHODS.items()) if cls.uses_target)
        click.echo(f"every method (the EMA target's; used by {with_target}):")
        for line in setting_lines(MethodConfig):
            click.echo(f"{'':8s}   {line}")


class Terminated(SystemExit):
    """SIGTERM (schedulers, ``docker stop``, ``kill``) raised in the main thread, so that every command
    cleans up as after Ctrl-C (temporary output folders are removed) and exits 143."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(143)


def _default_sigterm_in_child() -> None:
    """A forked child (a DataLoader worker) takes the default SIGTERM again: it dies when ended."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


_FORK_HOOK = {"registered": False}


def handle_sigterm() -> Callable | int | None:
    """SIGTERM raises :class:`Terminated` in this process (not in its forked children); returns the
    previous handler (``main`` puts it back)."""
    if not _FORK_HOOK["registered"]:
        os.register_at_fork(after_in_child=_default_sigterm_in_child)
        _FORK_HOOK["registered"] = True
    return signal.signal(signal.SIGTERM, _raise_terminated)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI; user errors -> one line + exit 2; ``--debug`` -> traceback; Ctrl-C -> exit
    130, SIGTERM -> exit 143 (``pretrain`` and ``adapt`` first write a checkpoint of the current step)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = handle_sigterm() if in_main_thread else None
    try:
        _run(argv, debug)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run(argv: list[str], debug: bool) -> None:
    """Run the command line; every outcome as ``main`` describes it."""
    try:
        cli.main(args=argv, prog_name="cellssl", standalone_mode=False)
    except (Terminated, click.exceptions.Abort, KeyboardInterrupt) as exc:
        sys.exit(_stopped(exc))
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        sys.exit(_failed(exc, debug))


def _stopped(exc: BaseException) -> int:
    """Say how the command was stopped; the exit code: 143 for SIGTERM, 130 for Ctrl-C."""
    if isinstance(exc, Terminated):
        click.echo("terminated (SIGTERM)", err=True)
        return 143
    click.echo("aborted" if isinstance(exc, click.exceptions.Abort) else "interrupted", err=True)
    return 130


def _failed(exc: Exception, debug: bool) -> int:
    """The one-line error of ``exc`` (the traceback with ``--debug``); the exit code: 2 for a user's
    mistake or a file-system error (a full disk: the way out), 1 for an internal bug."""
    if debug:
        traceback.print_exc()
    if isinstance(exc, CellSSLError):
        click.echo(f"error: {exc}", err=True)
        return 2
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        hint = " — the disk is full; free space or choose another --out" if exc.errno == 28 else ""
        click.echo(f"error: {exc.strerror or exc}{where}{hint}", err=True)
        return 2
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    click.echo(f"error: internal error {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
    return 1


if __name__ == "__main__":
    main()
