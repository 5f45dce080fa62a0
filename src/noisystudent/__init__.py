"""Noisy Student Training for PyTorch (Xie et al., CVPR 2020, arXiv 1911.04252).

    model = noisystudent.load("runs/demo")   # a trained run (or a model file) as a classifier

`load` is imported on first use (classifier.py), so `import noisystudent` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]

if TYPE_CHECKING:
    from .classifier import load


def __getattr__(name: str) -> Any:
    if name == "load":
        from .classifier import load

        return load
    raise AttributeError(f"module 'noisystudent' has no attribute '{name}'")
