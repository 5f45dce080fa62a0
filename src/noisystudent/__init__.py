"""Noisy Student Training for PyTorch (Xie et al., CVPR 2020, arXiv 1911.04252)."""

__version__ = "0.1.0"
