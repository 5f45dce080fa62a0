"""A training stage's checkpoint: what it must match to be resumed, and save/restore.

The engine's training is a pure function of (seed, stage, epoch, step) (engine.py), so a
checkpoint needs only the position besides the weights, optimizer, scheduler, grad scaler, any
extra state (e.g. a weight EMA) and the running meters. RNG states are saved and restored too,
for anything drawing from the global generators outside that scheme.

A checkpoint belongs to its identity: the recipe, the data sizes and what the stage adds (the
model, the classes, the sha256 of the files it trained from). One made for other settings is
refused, saying what differs; one made from other input files (the teacher or the selection was
re-run since) is discarded so training restarts (`discard_if_inputs_changed`).
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import TrainConfig
from .errors import UserError
from .rundir.io import load_state, save_state

CHECKPOINT_FORMAT = "noisystudent-train-state"
CHECKPOINT_VERSION = 1
# TrainConfig keys that may differ between a checkpoint and the run resuming it
_RUNTIME_TRAIN_KEYS = {"checkpoint_every_steps"}


def recipe_identity(tc: TrainConfig, seed: int, tag: str, steps_per_epoch: int, n_l: int,
                    n_u: int) -> dict[str, Any]:  # fmt: skip
    """The part of a checkpoint's identity that the engine knows: stage, recipe, data sizes."""
    ident = {
        "format_version": CHECKPOINT_VERSION,
        "noisystudent_version": ".".join(__version__.split(".")[:2]),
        "stage": tag,
        "seed": seed,
        "steps_per_epoch": steps_per_epoch,
        "labeled_images": n_l,
        "unlabeled_images": n_u,
    }
    ident.update({k: v for k, v in asdict(tc).items() if k not in _RUNTIME_TRAIN_KEYS})
    return ident


def rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _np_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _np_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}  # fmt: skip


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(_tuples(st["python"]))
    n = st["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _tuples(x: Any) -> Any:
    """random.setstate wants the tuples back that a round trip may have made lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def load_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Read a training checkpoint (torch.load weights_only=True: no code can run) and refuse one
    made for another model, class count, recipe or noisystudent version, saying what differs."""
    st = load_state(path)
    if not isinstance(st, dict) or st.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"'{path}' is not a noisystudent training checkpoint; delete it to restart that stage"
        )
    old = st.get("identity", {})
    diff = [
        f"{k}={old.get(k)!r} (this run: {identity.get(k)!r})"
        for k in sorted(set(old) | set(identity))
        if old.get(k) != identity.get(k)
    ]
    if diff:
        raise UserError(
            f"checkpoint '{path}' was made for a different run: {', '.join(diff[:5])}; "
            f"delete it to restart that stage, or use the settings it was made with"
        )
    return st


class Checkpoint:
    """The checkpoint file of one training stage.

    identity: what the stage adds to the engine's recipe identity (model name, classes, the
    sha256 of its input files under "inputs"); every: steps between checkpoints (0: epoch ends
    only); extra: objects with state_dict()/load_state_dict() saved beside the model (the engine
    adds its weight EMA here); write: False on torchrun ranks other than 0 (they hold the same
    weights and never write)."""

    def __init__(self, path: Path, identity: dict[str, Any] | None = None, every: int = 0,
                 extra: dict[str, Any] | None = None, write: bool = True):  # fmt: skip
        self.path, self.every, self.write = Path(path), every, write
        self.identity = dict(identity or {})
        self.extra = dict(extra or {})
        self.full_identity: dict[str, Any] = dict(self.identity)
        self.saved_step: int | None = None  # the step of the last good checkpoint on disk

    def discard_if_inputs_changed(self) -> bool:
        """Delete a checkpoint made from other input files than this identity's "inputs";
        returns whether one was deleted."""
        if not self.path.is_file():
            return False
        if load_state(self.path).get("identity", {}).get("inputs") == self.identity.get("inputs"):
            return False
        self.path.unlink()
        return True

    def restore(self, recipe: dict[str, Any], parts: dict[str, Any]) -> dict[str, Any] | None:
        """Load the checkpoint into `parts` (model, optimizer, ...) and self.extra; returns its
        position/meters record, or None when there is none. `recipe`: recipe_identity(...)."""
        self.full_identity = {**recipe, **self.identity}
        if not self.path.is_file():
            return None
        st = load_checkpoint(self.path, self.full_identity)
        for k, obj in parts.items():
            obj.load_state_dict(st[k])
        for k, obj in self.extra.items():
            if k in st.get("extra", {}):
                obj.load_state_dict(st["extra"][k])
        set_rng_state(st["rng"])
        self.saved_step = int(st["position"]["step"])
        return {
            "position": st["position"],
            "meters": st["meters"],
            "wall_s": float(st.get("wall_s", 0.0)),
            "last_loss": st.get("last_loss"),
        }

    def save(self, parts: dict[str, Any], position: dict[str, int], meters: dict[str, Any],
             last_loss: float, wall_s: float) -> None:  # fmt: skip
        """Write the checkpoint atomically (rank 0 only) and remember its step."""
        self.saved_step = position["step"]
        if not self.write:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "identity": self.full_identity,
            **{k: obj.state_dict() for k, obj in parts.items()},
            "extra": {k: obj.state_dict() for k, obj in self.extra.items()},
            "rng": rng_state(),
            "position": position,
            "meters": meters,
            "last_loss": last_loss,
            "wall_s": wall_s,
        }
        save_state(self.path, state)
