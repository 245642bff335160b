"""Evaluation of frozen or fine-tuned backbones on labelled cell images.

- :mod:`cellssl.eval.features` — features of a folder, computed once (``load_features``, ``embed``)
- :mod:`cellssl.eval.fewshot` — N-way K-shot episodes, SimpleShot (CL2N nearest centroid) / logreg
- :mod:`cellssl.eval.select` — which cells to label first (TypiClust, ProbCover, CoreSet, random)
- :mod:`cellssl.eval.linear` — logistic-regression linear probe
- :mod:`cellssl.eval.knn` — weighted kNN (and the online kNN monitor used during pretraining)
- :mod:`cellssl.eval.finetune` — supervised fine-tuning with early stopping
- :mod:`cellssl.eval.report` — report.json / report.md / plots (t-SNE, UMAP)
- :mod:`cellssl.eval.tables` — AnnData ``.h5ad`` and Parquet outputs (``embed --format``, ``predict --format``)
- :mod:`cellssl.eval.labmix` — lab-effect scores: lab mixing within types, iLISI, type separation
"""
