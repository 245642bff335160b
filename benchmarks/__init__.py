"""cellssl's benchmarks: quality, cross-lab, selection, prediction, transfer, speed and scale.

Each runs from the repository root as a module, e.g. ``python -m benchmarks.quality --quick``; what
more than one of them uses lives in :mod:`benchmarks.common` (a benchmark never imports another
benchmark's script, except :mod:`benchmarks.crosslab`, the quality benchmark's cross-lab columns).
"""
