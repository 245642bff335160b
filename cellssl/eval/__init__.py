"""Evaluation of frozen or fine-tuned backbones on labelled cell images.

- :mod:`cellssl.eval.features` — features of a folder, computed once (``load_features``, ``embed``)
- :mod:`cellssl.eval.fewshot` — N-way K-shot episodes, SimpleShot (CL2N nearest centroid) / logreg
- :mod:`cellssl.eval.linear` — logistic-regression linear probe (and the ``classifier.pt`` it saves)
- :mod:`cellssl.eval.knn` — weighted kNN (and the online kNN monitor used during pretraining)
- :mod:`cellssl.eval.finetune` — supervised fine-tuning with early stopping
- :mod:`cellssl.eval.probes` — what the probe commands share: train/test features, the logistic
  regression, the saved classifier (backbone + linear head)
- :mod:`cellssl.eval.unsure` — the ``unsure`` calibration a classifier is saved with (``predict`` uses it)
- :mod:`cellssl.eval.metrics` — accuracy, balanced accuracy, macro-F1, confusion matrix, 95 % intervals
- :mod:`cellssl.eval.report` — report.json / report.md / plots (t-SNE, UMAP)
- :mod:`cellssl.eval.tables` — AnnData ``.h5ad`` and Parquet outputs (``embed --format``, ``predict --format``)
- :mod:`cellssl.eval.labmix` — lab-effect scores: lab mixing within types, iLISI, type separation
- :mod:`cellssl.eval.settings` — the commands' choices and defaults, without heavy imports (the CLI reads them)

Applying a trained model (``predict``, ``export``, ``select``) is :mod:`cellssl.apply`.
"""
