"""Domain adaptation: carry a model to a new lab.

* :mod:`cellssl.adapt.continued` — ``adapt``: continued SSL on the target lab's unlabelled images
  (or AdaBN only: :mod:`cellssl.models.bn`), writing a normal checkpoint;
* :mod:`cellssl.adapt.shift` — a simulated scanner/lab shift of a folder (for benchmarks and tests);
* :mod:`cellssl.adapt.report` — ``transfer_report``: accuracy and domain gap of each step.

Stain normalisation (Macenko / Reinhard) is :mod:`cellssl.data.stain`: the data layer applies it
while reading (``data.stain_normalize``), the ``stain-normalize`` command and the transfer report
use it from there. Submodules are imported where used, so importing the package costs nothing.
"""

__all__ = ["continued", "report", "shift"]
