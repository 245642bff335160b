"""cellssl: self-supervised learning for cell images."""

__version__ = "0.1.0"
