"""Each choice, default and report kind has one source: the command line derives its options from
the modules that act on them, and a report's kind is an object its command passes, not a string."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys

import click

from cellssl.adapt import continued, report
from cellssl.apply import export as export_module
from cellssl.apply import predict as predict_module
from cellssl.apply import select as select_module
from cellssl.cli import cli
from cellssl.config import EvalConfig
from cellssl.eval import features, finetune, linear, tables, unsure
from cellssl.eval import fewshot as fewshot_module
from cellssl.eval import knn as knn_module
from cellssl.eval.report import REPORT_KINDS, ReportKind, format_summary, write_report
from conftest import REPO


def _options(*command: str) -> dict:
    group = cli
    for name in command:
        group = group.commands[name]
    return {p.name: p for p in group.params}


def _default(function, name: str):
    return inspect.signature(function).parameters[name].default


def test_cli_choices_and_defaults_are_those_of_the_code_they_drive():
    """A choice or default copied into cli.py drifts; these are read from the source."""
    ev = EvalConfig()
    sel = _options("select")
    assert tuple(sel["strategy"].type.choices) == select_module.STRATEGIES
    assert sel["strategy"].default == _default(select_module.select, "strategy") == select_module.STRATEGIES[0]
    assert sel["budget"].default == _default(select_module.select, "budget")
    assert sel["n_classes"].default == _default(select_module.select, "n_classes")
    assert sel["batch_size"].default == ev.batch_size
    few = _options("fewshot")
    assert tuple(few["classifier"].type.choices) == fewshot_module.FEWSHOT_CLASSIFIERS
    assert few["classifier"].default == _default(fewshot_module.fewshot, "classifier")
    assert tuple(few["shots"].default) == tuple(ev.shots) == _default(fewshot_module.fewshot, "shots")
    assert few["queries"].default == ev.queries == _default(fewshot_module.fewshot, "queries")
    assert few["episodes"].default == ev.episodes == _default(fewshot_module.fewshot, "episodes")
    assert few["ways"].default == "all" and ev.ways is None and _default(fewshot_module.fewshot, "ways") is None
    knn = _options("knn")
    assert knn["k"].default == ev.knn_k == _default(knn_module.knn, "k")
    assert knn["temperature"].default == ev.knn_temperature == _default(knn_module.knn, "temperature")
    exp = _options("export")
    assert tuple(exp["fmt"].type.choices) == export_module.EXPORT_FORMATS
    assert exp["fmt"].default == _default(export_module.export, "fmt")
    assert _options("embed")["fmt"].type.choices == ("auto", *tables.EMBED_FORMATS)
    pred = _options("predict")
    assert pred["fmt"].type.choices == tables.PREDICT_FORMATS
    assert pred["fmt"].default == _default(predict_module.predict, "fmt")
    assert f"{_default(unsure.calibrate, 'target_error'):g}" in pred["target_error"].help
    assert f"{_default(unsure.calibrate, 'ood_quantile'):g}" in pred["ood_quantile"].help


# every command and the function it runs (those taking **fields also take the FeatureOptions fields)
RUNS = {"fewshot": fewshot_module.fewshot, "linear": linear.linear, "knn": knn_module.knn,
        "finetune": finetune.finetune, "embed": tables.embed_outputs, "predict": predict_module.predict,
        "export": export_module.export, "select": select_module.select, "adapt": continued.adapt,
        "transfer-report": report.transfer_report}


def _defaults(function) -> dict:
    params = inspect.signature(function).parameters
    out = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        out.update({f.name: f.default for f in dataclasses.fields(features.FeatureOptions)} | out)
    return out


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def test_every_option_default_is_the_default_of_the_function_it_runs():
    """Each option with a default, converted as the command line converts it ('all' -> None), equals
    the default of the same-named parameter of the function the command calls: none is a stale copy."""
    drift, compared = [], 0
    for name, function in RUNS.items():
        command, defaults = cli.commands[name], _defaults(function)
        ctx = click.Context(command)
        for option in command.params:
            default = option.get_default(ctx, call=True)
            if option.name not in defaults or option.value_is_missing(default):
                continue
            compared += 1
            value = option.type_cast_value(ctx, default)
            if _plain(value) != _plain(defaults[option.name]):
                drift.append(f"{name} --{option.name}: {value!r} on the command line, "
                             f"{defaults[option.name]!r} in code")
    assert compared > 40 and not drift, "\n".join(drift)


def test_help_loads_no_torch():
    """The options above come from light modules: `cellssl select --help` still answers without torch."""
    code = ("import sys\nfrom cellssl.cli import main\ntry:\n    main(['select', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--strategy" in res.stdout and res.stdout.strip().splitlines()[-1] == "False"


def test_a_report_kind_is_what_its_command_passes(tmp_path):
    """write_report takes the kind as an object (title, results section, summary), so a new kind
    needs no branch in eval/report.py; a report read back finds its kind by the name it saved."""
    toy = ReportKind("toy", "Toy evaluation", body=lambda r: ["## Score", "", f"{r['score']} points", ""],
                     summary=lambda r: [f"  {r['score']} points"], plot=lambda kind, r, paths: {})
    path = write_report({"score": 7, "checkpoint": {"spec": "random:resnet18"}}, tmp_path / "toy.json", toy)
    md = (tmp_path / "toy.md").read_text()
    assert md.startswith("# Toy evaluation\n") and "## Score\n\n7 points" in md and "random:resnet18" in md
    saved = json.loads(path.read_text())
    assert saved["kind"] == "toy"
    assert format_summary(saved, toy).splitlines()[:2] == ["Toy evaluation of random:resnet18 ()", "  7 points"]
    assert set(REPORT_KINDS) == {"fewshot", "linear", "knn", "finetune"}
    for name, kind in REPORT_KINDS.items():
        assert kind.name == name and format_summary({"kind": name, "checkpoint": {"spec": "s"}}).startswith(kind.title)
