"""Domain adaptation: carry a model to a new lab.

* :mod:`cellssl.adapt.continued` — ``adapt``: continued SSL on the target lab's unlabelled images
  (or AdaBN only: :mod:`cellssl.models.bn`), writing a normal checkpoint;
* :mod:`cellssl.adapt.stain` — Macenko / Reinhard stain normalisation (torchstain, numpy backend);
* :mod:`cellssl.adapt.shift` — a simulated scanner/lab shift of a folder (for benchmarks and tests);
* :mod:`cellssl.adapt.report` — ``transfer_report``: accuracy and domain gap of each step.

Submodules are imported lazily (``from cellssl.adapt.stain import build_stain_normalizer``), so
importing the package costs nothing.
"""

__all__ = ["continued", "report", "shift", "stain"]
