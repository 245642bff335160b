"""Applying a trained model: classify new cells, hand the model on, choose the cells to label.

- :mod:`cellssl.apply.model` — a trained classifier ready to run (``load_predictor``: finetune's
  ``best.pt`` or linear's ``classifier.pt``), the one loader ``predict`` and ``export`` share
- :mod:`cellssl.apply.predict` — ``cellssl predict``: predictions.csv, the differential count, unsure cells
- :mod:`cellssl.apply.export` — ``cellssl export``: safetensors for timm, ONNX, config.json, a model card
- :mod:`cellssl.apply.select` — ``cellssl select``: which cells to label first (TypiClust, ProbCover,
  CoreSet, random)
- :mod:`cellssl.apply.settings` — their choices and defaults, without heavy imports (the CLI reads them)

The unsure calibration these models carry is made when they are fitted, so it lives with the
fitting: :mod:`cellssl.eval.unsure`.
"""
