"""A trained model as a classifier of new images: `noisystudent.load(...)` and the `predict`
command.

    model = noisystudent.load("runs/demo")           # the last trained iteration
    probs = model.predict(["a.jpg", "b.png"])        # (2, C) float32 probabilities
    model.classes[int(probs[0].argmax())]

A source is a run directory (its highest iteration with a model file, or `iteration`), a
folder holding a model file (iter<i>/, its finetune/), or a model file itself (its model.json
beside it). Loading goes through artifacts.load_model, so a file from another architecture or
class list, a foreign file, or one changed since its training stage wrote it is refused.

Images see exactly the run's evaluation view (data.load_rgb: any mode to RGB; data.
resize_center: shorter side to image_size, bilinear, then a center crop; uint8 CHW) and the
run's precision and compile policy (its config's `precision` / `compile`; engine.predict).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from . import engine
from .artifacts import load_model
from .augment import ViewDataset
from .config import Config, load_config
from .data import (
    IMAGE_EXTS,
    PIL_MAX_PIXELS,
    BadImageLog,
    ImageSet,
    load_rgb,
    read_index,
    resize_center,
    scan_unlabeled,
    to_rgb,
)
from .errors import UserError
from .models import Classifier
from .rundir import ModelPaths, RunDir, RunLayout, atomic_write
from .runtime import Runtime, resolve_device
from .tarshards import is_tar

OUT_FORMATS = (".csv", ".jsonl")


@dataclass(frozen=True)
class _FilePaths(ModelPaths):
    """A model file by its own path (any name), its model.json beside it."""

    file: Path = Path()

    @property
    def model(self) -> Path:
        return self.file


def _run_root(start: Path) -> Path | None:
    """The run directory a model folder lies in (iter<i>/ or iter<i>/finetune/), if any."""
    for d in (start, *list(start.parents)[:2]):
        if RunLayout(d).manifest.is_file() or RunLayout(d).config.is_file():
            return d
    return None


def _resolve(source: str | Path, iteration: int | None) -> tuple[Path | None, ModelPaths, int]:
    """(run directory or None, the model's paths, its iteration) of a source."""
    p = Path(source)
    if not p.exists():
        raise UserError(
            f"model source '{p}' does not exist; give a run directory (made by `noisystudent "
            f"run` or `demo`) or a model file"
        )
    lay = RunLayout(p)
    if p.is_dir() and (lay.config.is_file() or lay.manifest.is_file()):
        trained = [i for i in lay.iterations() if lay.it(i).model.is_file()]
        if not trained:
            raise UserError(
                f"run directory '{p}' holds no trained model yet; run `noisystudent run` "
                f"(or train-teacher) first"
            )
        i = trained[-1] if iteration is None else iteration
        if i not in trained:
            raise UserError(
                f"run directory '{p}' has no model of iteration {i}; trained: "
                f"{', '.join(map(str, trained))}"
            )
        return p, lay.it(i), i
    if iteration is not None:
        raise UserError(
            f"--iteration picks a model in a run directory; '{p}' is not one (give the run "
            f"directory, or leave --iteration out)"
        )
    if p.is_dir():
        paths = ModelPaths(p)
        if not paths.model.is_file():
            raise UserError(
                f"'{p}' is neither a run directory nor a folder holding a model file "
                f"('{paths.model.name}')"
            )
    else:
        paths = _FilePaths(p.parent, p)
    if not paths.model_meta.is_file():
        raise UserError(
            f"model file '{paths.model}' has no '{paths.model_meta.name}' beside it (class names, "
            f"image size); copy it along with the weights"
        )
    return _run_root(paths.dir), paths, -1


class ImageClassifier:
    """A trained model ready for new images; see `load`.

    classes: class names in output order. image_size: the square input size. module: the
    plain nn.Module (normalisation inside; uint8 or [0, 1] float (N, 3, S, S) input; eval mode,
    on `runtime.device`). transform(PIL image) -> uint8 (3, S, S): the evaluation view."""

    def __init__(self, module: Classifier, meta: dict[str, Any], path: Path, iteration: int,
                 runtime: Runtime, batch_size: int, workers: int,
                 max_pixels: int | None = PIL_MAX_PIXELS):  # fmt: skip
        self.module = module.to(runtime.device).eval()
        self.meta = meta
        self.name: str = meta["name"]
        self.classes: list[str] = list(meta["classes"])
        self.image_size: int = int(meta["image_size"])
        self.path, self.iteration, self.runtime = path, iteration, runtime
        self.batch_size, self.workers = batch_size, workers
        self.max_pixels = max_pixels  # images with more pixels are unreadable (the run's limit)

    def __repr__(self) -> str:
        return (f"ImageClassifier({self.name}, {len(self.classes)} classes, "
                f"{self.image_size} px, '{self.path}')")  # fmt: skip

    def transform(self, img: Image.Image) -> torch.Tensor:
        """A PIL image -> uint8 (3, S, S): RGB, shorter side resized to S (bilinear), center
        crop; what the run's evaluation feeds the model."""
        return pil_to_tensor(resize_center(to_rgb(img), self.image_size))

    def stream(self, images: ImageSet, batch_size: int | None = None, desc: str = "predict",
               job_images: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """(probabilities (n, C) float32 on CPU, indices into `images` (n,)) batch by batch, for
        a file-backed set; unreadable files per images.bad_log (None: an error naming it)."""
        ds = ViewDataset(images, self.image_size)
        b = batch_size or self.batch_size
        for logits, idx in engine.predict(self.module, ds, b, self.runtime, self.workers, desc,
                                          job_images):  # fmt: skip
            yield logits.softmax(1), idx

    def predict(self, images: Any, batch_size: int | None = None) -> torch.Tensor:
        """Class probabilities (N, C), float32 on CPU, rows in input order.

        images: a list of image paths (read as the run reads files; an unreadable one is an
        error naming it), a list of PIL images (made into the evaluation view), or a tensor
        batch (N, 3, S, S) at S = image_size, uint8 0..255 or float in [0, 1] (e.g. stacked
        `transform` outputs); one path or PIL image gives (1, C)."""
        b = batch_size or self.batch_size
        if isinstance(images, torch.Tensor):
            return self._predict_tensor(images, b)
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        images = list(images)
        if not images:
            return torch.empty(0, len(self.classes))
        if all(isinstance(x, (str, Path)) for x in images):
            paths = [Path(x) for x in images]
            s = ImageSet(self.classes, [str(p) for p in paths],
                         np.full(len(paths), -1, dtype=np.int64), paths=paths,
                         max_pixels=self.max_pixels)  # fmt: skip
            out = torch.empty(len(paths), len(self.classes))
            for probs, idx in self.stream(s, b):
                out[idx] = probs
            return out
        x = torch.stack([self.transform(self._image(v)) for v in images])
        return self._predict_tensor(x, b)

    def _image(self, v: Any) -> Image.Image:
        if isinstance(v, Image.Image):
            return v
        if isinstance(v, (str, Path)):
            return load_rgb(v, self.max_pixels)
        raise TypeError(f"predict() takes image paths, PIL images or a tensor, not {type(v)}")

    def _predict_tensor(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        s = self.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            hint = " (channels last? use x.permute(0, 3, 1, 2))" if x.shape[-1:] == (3,) else ""
            raise ValueError(
                f"predict() takes a (N, 3, {s}, {s}) tensor, got {tuple(x.shape)}{hint}; "
                f"use .transform(image) for the evaluation view"
            )
        if not (x.dtype == torch.uint8 or x.is_floating_point()):
            raise ValueError(
                f"predict() takes uint8 (0..255) or float ([0, 1]) images, not {x.dtype}"
            )
        if x.is_floating_point():
            x = x.float()
        nhwc = x.detach().cpu().permute(0, 2, 3, 1).numpy()  # a view; read a batch at a time
        logits = engine.predict_array(self.module, nhwc, batch, self.runtime, progress=False)
        return logits.softmax(1) if len(logits) else torch.empty(0, len(self.classes))


def load(source: str | Path, iteration: int | None = None, device: str | None = "auto",
         progress: bool | None = False) -> ImageClassifier:  # fmt: skip
    """A trained model as an ImageClassifier.

    source: a run directory (default: its last trained iteration; `iteration` picks another),
    a folder holding a model file, or a model file (model.json beside it). device: "auto"
    (CUDA when present), "cpu", "cuda:1", ...; None: the run's own `device`. Precision and
    compile follow the run's config (defaults without one). progress: progress bars (on
    stderr) for path inputs; None: the run's `progress`."""
    root, paths, i = _resolve(source, iteration)
    cfg = load_config(root) if root is not None and RunLayout(root).config.is_file() else Config()
    expect = cfg.models[i] if root is not None and 0 <= i < len(cfg.models) else None
    run = RunDir(root if root is not None else paths.dir)
    model, meta = load_model(run, max(i, 0), "model", expect, None, paths)
    if meta.get("image_size") is None:
        raise UserError(f"model file '{paths.model}' states no image size (header or model.json)")
    rt = Runtime(resolve_device(cfg.device if device is None else device), cfg.precision,
                 cfg.compile, cfg.progress if progress is None else progress)  # fmt: skip
    return ImageClassifier(model, meta, paths.model, i, rt, cfg.eval_batch_size,
                           cfg.data.num_workers, cfg.data.max_image_pixels)  # fmt: skip


# --------------------------------------------------------------------------------------------
# the predict command: inputs, streaming output
class _PathStrings(Sequence):
    """A set's paths as strings (its uids for the bad-image listing), made per access."""

    def __init__(self, paths: Sequence):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return str(self.paths[i])


def _as_set(s: ImageSet) -> ImageSet:
    """No labels, uids = the files' paths (a tar member: 'archive::member')."""
    assert s.paths is not None
    return ImageSet(s.classes, _PathStrings(s.paths), np.full(len(s), -1, dtype=np.int64),
                    paths=s.paths, root=s.root)  # fmt: skip


def input_sets(specs: list[str], max_pixels: int | None) -> list[ImageSet]:
    """The images of predict's inputs, in order: a folder (recursive, with any .tar shards in
    it; class sub-folders are just paths here), an index file (.tsv), a .tar shard, image
    files (consecutive ones make one set)."""
    sets: list[ImageSet] = []
    files: list[Path] = []

    def flush() -> None:
        if files:
            sets.append(ImageSet([], [str(f) for f in files], np.full(len(files), -1, np.int64),
                                 paths=list(files)))  # fmt: skip
            files.clear()

    for spec in specs:
        p = Path(spec)
        if not p.exists():
            raise UserError(
                f"input '{p}' does not exist; give image files, folders, index files or .tar shards"
            )
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            files.append(p)
            continue
        flush()
        if p.is_dir() or is_tar(p):
            try:
                s = scan_unlabeled(p, [])
            except UserError as e:
                if str(e).endswith("holds no images"):
                    raise UserError(
                        f"input folder '{p}' holds no images (looked recursively for "
                        f"{', '.join(sorted(IMAGE_EXTS))} files and .tar shards)"
                    ) from None
                raise
        elif p.suffix == ".tsv":
            s = read_index(p, "predict input")
        else:
            raise UserError(
                f"input '{p}' is not an image file ({', '.join(sorted(IMAGE_EXTS))}), a folder, "
                f"an index file (.tsv) or a .tar shard"
            )
        if len(s) == 0:
            raise UserError(f"input '{p}' holds no images")
        sets.append(s)
    flush()
    for s in sets:
        s.max_pixels = max_pixels
    return [_as_set(s) for s in sets]


class _Rows:
    """Rows of predict's output: CSV (path, class_1, prob_1, ..., class_k, prob_k) or JSON
    lines ({"path", "classes", "probs"}), written as batches come."""

    def __init__(self, f, fmt: str, topk: int):
        self.f, self.fmt, self.topk = f, fmt, topk
        if fmt == ".csv":
            self.w = csv.writer(f, lineterminator="\n")
            self.w.writerow(["path", *(f"{w}_{r}" for r in range(1, topk + 1)
                                       for w in ("class", "prob"))])  # fmt: skip

    def write(self, paths: list[str], probs: torch.Tensor, classes: list[str]) -> None:
        p, c = probs.topk(self.topk, 1)
        for path, pr, ci in zip(paths, p.tolist(), c.tolist(), strict=True):
            names = [classes[j] for j in ci]
            vals = [round(v, 6) for v in pr]
            if self.fmt == ".csv":
                self.w.writerow(
                    [path, *(x for pair in zip(names, vals, strict=True) for x in pair)]
                )
            else:
                self.f.write(json.dumps({"path": path, "classes": names, "probs": vals}) + "\n")


def check_options(out: str | None, topk: int, batch_size: int | None) -> str:
    """predict's output format (".csv", ".jsonl"), after checking its options."""
    fmt = ".csv" if out is None else Path(out).suffix.lower()
    if fmt not in OUT_FORMATS:
        raise UserError(f"--out '{out}' must end in .csv or .jsonl")
    if topk < 1:
        raise UserError(f"--topk must be >= 1, got {topk}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    return fmt


def predict_files(clf: ImageClassifier, sets: list[ImageSet], out: str | None, topk: int = 1,
                  batch_size: int | None = None, on_bad: str = "skip") -> dict[str, Any]:  # fmt: skip
    """Classify every image of the sets (`input_sets`), one output row per readable image,
    streamed to `out` (.csv or .jsonl; written atomically) or to stdout as CSV. Unreadable
    images: skipped and listed in <out stem>.skipped.txt (on stderr with stdout output), or
    with on_bad="error" an error naming the first. Returns the count, seconds, images/s and
    the skipped images' log."""
    fmt = check_options(out, topk, batch_size)
    total = sum(len(s) for s in sets)
    listing = None if out is None else Path(out).with_suffix(".skipped.txt")
    log = BadImageLog("predict input", total, on_bad == "skip", 1.0, listing, "--on-bad")
    k = min(topk, len(clf.classes))
    res = {"images": 0, "seconds": 0.0, "skipped": log, "listing": listing, "out": out}

    def run(f) -> None:
        rows = _Rows(f, fmt, k)
        t0 = time.perf_counter()
        for s in sets:
            s.bad_log = log
            for probs, idx in clf.stream(s, batch_size, job_images=total):
                rows.write([s.uids[j] for j in idx.tolist()], probs, clf.classes)
                res["images"] += len(idx)
        f.flush()
        res["seconds"] = time.perf_counter() - t0

    if out is None:
        run(sys.stdout)
    else:
        atomic_write(Path(out), lambda p: _with_open(p, run))
        if listing is not None and not len(log):
            listing.unlink(missing_ok=True)  # a listing of an earlier run with bad images
    res["images_per_s"] = res["images"] / max(res["seconds"], 1e-9)
    return res


def _with_open(p: Path, fn) -> None:
    with open(p, "w", newline="") as f:
        fn(f)
