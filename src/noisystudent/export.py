"""`noisystudent export`: a trained model as one ONNX or TorchScript file for use without
noisystudent, verified against the PyTorch model on the run's own test images before it is kept.

The exported model is models.Classifier as the run evaluates it: images NCHW RGB at the trained
size, normalisation inside, logits out, any batch size. An ONNX graph has one input type, so
an ONNX file takes uint8 0..255 (default) or float32 [0, 1] (`--input-dtype float32`); the
TorchScript file takes either, like the PyTorch model. A JSON file beside it (the file's name
with ".json" appended) holds what a user needs to feed it: the class names in output order,
the image size, the exact resize and crop of the evaluation view, the input layout and range.

Verification: the first test image alone, then the rest in batches of 64 (so a batch size other
than the one the model was traced with is exercised), against the eager fp32 model on CPU; the
export is refused, and nothing is written, unless every argmax agrees and the probabilities
differ by at most 1e-4.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from . import __version__
from .artifacts import load_model
from .config import Config, load_config
from .data import BadImage, digits_sets, load_set
from .errors import UserError
from .models import Classifier
from .rundir import RunDir, RunLayout, sha256_file, write_json
from .rundir.io import TMP_SUFFIX

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT_DTYPES = ("uint8", "float32")
TOLERANCE = 1e-4  # max abs difference of fp32 probabilities
VERIFY_IMAGES = 512
VERIFY_BATCH = 64
ONNX_SINGLE_FILE_MAX = 1_800_000_000  # bytes of weights; over it they go to <file>.data


@dataclass
class Trained:
    """A run's trained model i, loaded with its identity checks."""

    cfg: Config
    run: RunDir
    i: int
    model: Classifier
    meta: dict[str, Any]


def load_trained(config: str, overrides: list[str] | None, iteration: int | None) -> Trained:
    """Model `iteration` of a run (default: the last trained one), for commands that only read
    the run: no lock, no config check against the saved config (the overrides given apply to
    this command only; nothing is written back)."""
    cfg = load_config(config, overrides)
    root = Path(config) if Path(config).is_dir() else Path(cfg.run_dir)
    if not RunLayout(root).config.is_file():
        raise UserError(
            f"run directory '{root}' does not exist or has no config.yaml; give a folder "
            f"made by `noisystudent run` or `demo`"
        )
    run = RunDir(root)
    trained = [i for i in run.paths.iterations() if run.it(i).model.is_file()]
    if iteration is None:
        if not trained:
            raise UserError(
                f"no trained model in '{root}'; run `noisystudent run` (or train-teacher) first"
            )
        iteration = trained[-1]
    elif not 0 <= iteration < len(cfg.models):
        raise UserError(f"--iteration {iteration} is outside models[0..{len(cfg.models) - 1}]")
    name = cfg.models[iteration] if iteration < len(cfg.models) else None
    model, meta = load_model(run, iteration, "model", name)
    return Trained(cfg, run, iteration, model.eval(), meta)


def description_path(out: Path) -> Path:
    """The JSON beside an exported file: its name with ".json" appended (model.onnx ->
    model.onnx.json), so an ONNX and a TorchScript export of the same model never share one,
    and an export beside model.safetensors never touches model.json."""
    return out.with_name(out.name + ".json")


def eval_view(size: int) -> dict[str, str]:
    """The evaluation view in words (data.resize_center, applied to data.to_rgb's image)."""
    return {
        "decode": "RGB, 8 bits a channel (grey, palette and alpha images converted as "
        "noisystudent.data.to_rgb does: transparency onto white)",
        "resize": f"shorter side to {size} px with PIL's Image.BILINEAR; the other side to "
        f"round(other * {size} / shorter), at least {size}; an image of exactly "
        f"{size}x{size} is used as it is",
        "crop": f"center {size}x{size}: left = (width - {size}) // 2, top = (height - {size}) "
        f"// 2 of the resized image",
        "function": "noisystudent.data.resize_center",
    }


# --------------------------------------------------------------------------------------------
def export_model(config: str, overrides: list[str] | None, iteration: int | None, fmt: str,
                 out: str | None = None, input_dtype: str = "uint8") -> dict[str, Any]:  # fmt: skip
    """`noisystudent export`: write, verify and describe the exported model; returns the
    description (also written beside the file)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown --format '{fmt}'; use one of: {', '.join(FORMATS)}")
    if input_dtype not in INPUT_DTYPES:
        raise UserError(f"unknown --input-dtype '{input_dtype}'; use uint8 or float32")
    if fmt == "onnx":
        _need_onnx()
    t = load_trained(config, overrides, iteration)
    default = t.run.it(t.i).export(FORMATS[fmt])
    target = Path(out) if out else default
    if target.is_dir():
        target = target / default.name
    side = description_path(target)
    _check_target(t.run, target, side)
    size = int(t.meta["image_size"])
    images = verification_images(t.cfg, size, VERIFY_IMAGES)
    model = t.model.cpu().float().eval()
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX,
                                    dir=target.parent))  # fmt: skip
    except OSError as e:
        raise UserError(_cannot_write(target, e)) from None
    try:
        part = tmp / target.name
        if fmt == "onnx":
            run, opset = _export_onnx(model, images, part, input_dtype)
            checks = [(input_dtype, run)]
            tool = "onnxruntime"
        else:
            module = _export_torchscript(model, images, part)
            checks = [("uint8", module), ("float32", module)]
            tool, opset = "TorchScript", None
        results = [(dt, _verify(fn, model, images, dt)) for dt, fn in checks]
        worst = max((r for _, r in results), key=lambda r: (r["mismatches"], r["max_abs_diff"]))
        kinds = " and ".join(f"{dt} input" for dt, _ in results)
        print(
            f"verified with {tool} on {worst['images']} test images ({kinds}): argmax agreement "
            f"{worst['agreement']:.2f}% ({worst['images'] - worst['mismatches']}/"
            f"{worst['images']}), max abs probability difference {worst['max_abs_diff']:.1e} "
            f"(tolerance {TOLERANCE:.0e})"
        )
        if worst["mismatches"] or not worst["max_abs_diff"] <= TOLERANCE:
            raise UserError(
                f"export refused: {tool} and PyTorch disagree on {worst['mismatches']} of "
                f"{worst['images']} test images (max abs probability difference "
                f"{worst['max_abs_diff']:.1e}, tolerance {TOLERANCE:.0e}); nothing was written"
            )
        for p in sorted(tmp.iterdir()):  # the model file (and an ONNX external-data file)
            os.replace(p, target.parent / p.name)
    except OSError as e:
        raise UserError(_cannot_write(target, e)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    desc = _description(t, fmt, target, input_dtype, opset, worst, size)
    write_json(side, desc)
    kb = target.stat().st_size / 1024
    print(f"exported iter {t.i} ({t.meta['name']}) to {target} ({kb:,.0f} KiB); see {side}")
    return desc


def _need_onnx() -> None:
    missing = []
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise UserError(
            f"ONNX export needs {', '.join(missing)}; install them with "
            f"`pip install 'noisystudent[export]'` (or use --format torchscript)"
        )


def _cannot_write(target: Path, e: OSError) -> str:
    if isinstance(e, (NotADirectoryError, FileExistsError)):
        why = f"a file is in the way ('{e.filename or target.parent}')"
    else:
        why = f"{e.strerror or e}" + (f" ('{e.filename}')" if e.filename else "")
    return f"cannot write the export to '{target}': {why}; give --out a path you can write to"


def _check_target(run: RunDir, target: Path, side: Path) -> None:
    """Refuse to overwrite a file of the run (a model, its model.json, a result, the config)
    and a target whose folder cannot be made or written, before any work is done."""
    paths = run.paths
    own = {paths.config, paths.manifest, paths.summary, paths.metrics, paths.report}
    for i in paths.iterations():
        p = run.it(i)
        own |= {p.model, p.model_meta, p.eval, p.checkpoint}
    own = {q.resolve() for q in own}
    for p in (target, side):
        if p.resolve() in own or run.manifest.output_record(p) is not None:
            raise UserError(
                f"--out '{target}' would overwrite '{p}', a file of the run; give another path"
            )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(_cannot_write(target, e)) from None
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise UserError(
            f"cannot write the export to '{target}': its folder is not writable; give --out "
            f"a path you can write to"
        )


def verification_images(cfg: Config, size: int, n: int) -> np.ndarray:
    """Up to `n` of the run's test images, evenly spread over the set (class folders are listed
    class by class), as the evaluation view sees them: uint8 (n, size, size, 3). Only these are
    read (not the whole run's data); unreadable ones are left out."""
    d = cfg.data
    if d.dataset == "digits":
        s = digits_sets(d.image_size, d.labels_per_class, seed=cfg.seed)[2]
    else:
        if d.test is None or not Path(d.test).exists():
            raise UserError(
                f"cannot verify the export: the run's test data '{d.test}' (config key "
                f"data.test) is not found; run from the folder the run was made in, or add "
                f"data.test=PATH"
            )
        s = load_set(d.test, "test")
    if len(s) == 0:
        raise UserError(f"cannot verify the export: the run's test data '{d.test}' is empty")
    idx = np.unique(np.linspace(0, len(s) - 1, min(n, len(s))).round().astype(np.int64))
    sub = s.subset(idx)
    sub.max_pixels = d.max_image_pixels
    from .augment import ViewDataset

    ds = ViewDataset(sub, size)
    out = []
    for k in range(len(ds)):
        try:
            out.append(ds[k][0].permute(1, 2, 0).numpy())
        except BadImage:
            continue
    if not out:
        raise UserError(f"cannot verify the export: no readable image in '{d.test}'")
    return np.stack(out)


def _inputs(images: np.ndarray, dtype: str) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return x if dtype == "uint8" else x.to(torch.float32).div(255.0)


def _batches(n: int) -> list[slice]:
    """One image alone, then batches of VERIFY_BATCH: two batch sizes at least."""
    return [slice(0, 1)] + [slice(k, k + VERIFY_BATCH) for k in range(1, n, VERIFY_BATCH)]


@torch.no_grad()
def _verify(run: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, images: np.ndarray,
            dtype: str) -> dict[str, Any]:  # fmt: skip
    """Argmax agreement and max abs probability difference of `run` against the eager model."""
    x = _inputs(images, dtype)
    ref = torch.cat([model(x[b]).float() for b in _batches(len(x))]).softmax(1)
    got = torch.cat([run(x[b]).float() for b in _batches(len(x))]).softmax(1)
    if got.shape != ref.shape:
        raise UserError(
            f"export refused: the exported model gives outputs of shape {tuple(got.shape)}, "
            f"PyTorch {tuple(ref.shape)}; nothing was written"
        )
    mismatches = int((got.argmax(1) != ref.argmax(1)).sum())
    return {
        "images": len(x),
        "mismatches": mismatches,
        "agreement": 100.0 * (len(x) - mismatches) / len(x),
        "max_abs_diff": float((got - ref).abs().max()),
        "batch_sizes": sorted({len(range(len(x))[b]) for b in _batches(len(x))}),
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without torch's own notices during export: TorchScript's deprecation warnings, the
    ONNX exporter's progress lines on stdout."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _export_onnx(model: Classifier, images: np.ndarray, path: Path, dtype: str):
    """ONNX with a dynamic batch dimension; returns (onnxruntime callable, opset).

    torch 2.14 has two exporters. `dynamo=True` (torch.export based, the default since torch
    2.9) needs onnxscript, which the `export` extra installs; `dynamo=False`, the TorchScript
    based one, also works offline but is deprecated ("the feature will be removed"), so the
    supported one is used. Both agree with PyTorch within ~2e-7 on the built-in models."""
    import onnx
    import onnxruntime as ort

    example = _inputs(images[:2] if len(images) >= 2 else np.repeat(images, 2, 0), dtype)
    try:
        with _quiet():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
                # one self-contained file; weights beside it only where ONNX's 2 GB limit
                # (protobuf) forces it
                external_data=_weight_bytes(model) > ONNX_SINGLE_FILE_MAX,
            )
    except OSError:
        raise
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        raise UserError(
            f"ONNX export of '{type(model.net).__name__}' failed ({type(e).__name__}: {msg}); "
            f"try --format torchscript"
        ) from None
    opset = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), None)  # fmt: skip
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {name: x.numpy()})[0])

    return run, opset


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


class _Pixels(nn.Module):
    """What the TorchScript file holds: models.Classifier's input handling (uint8 0..255 or
    float [0, 1], normalised inside, the same ops in the same order) around the traced network."""

    def __init__(self, net: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype).div_(255.0)
        return self.net((x - self.mean) / self.std)


def _export_torchscript(model: Classifier, images: np.ndarray, path: Path):
    """The network traced (any timm or built-in model traces; not all of them script), inside a
    scripted wrapper that keeps the uint8-or-float branch; returns the module loaded back."""
    example = _inputs(images[:2] if len(images) >= 2 else np.repeat(images, 2, 0), "float32")
    try:
        with _quiet(), torch.no_grad():
            net = torch.jit.trace(model.net, model_input(model, example))
            module = torch.jit.script(_Pixels(net, model.mean, model.std))
            torch.jit.save(module, str(path))
            loaded = torch.jit.load(str(path), map_location="cpu").eval()
    except OSError:
        raise
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        raise UserError(
            f"TorchScript export of '{type(model.net).__name__}' failed ({type(e).__name__}: "
            f"{msg}); try --format onnx"
        ) from None
    return loaded


def model_input(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    """What Classifier hands its network for a [0, 1] batch (the normalised image)."""
    return (x - model.mean) / model.std


def _description(t: Trained, fmt: str, target: Path, input_dtype: str, opset: int | None,
                 check: dict[str, Any], size: int) -> dict[str, Any]:  # fmt: skip
    classes = list(t.meta["classes"])
    dtype = input_dtype if fmt == "onnx" else "uint8 or float32"
    value_range = {"uint8": "0..255", "float32": "[0, 1]"}.get(dtype, "0..255 (uint8) or [0, 1]")
    desc = {
        "format": fmt,
        "file": target.name,
        "model": t.meta["name"],
        "iteration": t.i,
        "classes": classes,
        "num_classes": len(classes),
        "image_size": size,
        "input": {
            "name": "images",
            "layout": "NCHW",
            "shape": ["batch", 3, size, size],
            "channels": "RGB",
            "dtype": dtype,
            "range": value_range,
        },
        "output": {
            "name": "logits",
            "shape": ["batch", len(classes)],
            "meaning": "class logits in the order of `classes`; softmax over axis 1 gives the "
            "probabilities",
        },
        "normalization": {
            "inside_model": True,
            "mean": [round(v, 6) for v in t.model.mean.flatten().tolist()],
            "std": [round(v, 6) for v in t.model.std.flatten().tolist()],
            "formula": "(x / 255 - mean) / std for uint8; (x - mean) / std for [0, 1] floats",
        },
        "preprocess": eval_view(size),
        "verification": {
            "against": "the PyTorch model in fp32 on CPU, the run's test images",
            "images": check["images"],
            "argmax_agreement": check["agreement"],
            "max_abs_prob_diff": check["max_abs_diff"],
            "tolerance": TOLERANCE,
            "batch_sizes": check["batch_sizes"],
        },
        "source": {
            "run_dir": str(t.run.root.resolve()),
            "model_file": str(t.run.it(t.i).model.resolve()),
            "sha256": sha256_file(t.run.it(t.i).model),
        },
        "noisystudent_version": __version__,
        "torch_version": torch.__version__,
    }
    if opset is not None:
        desc["onnx_opset"] = opset
    if fmt == "torchscript":
        desc["load"] = "torch.jit.load(path).eval(); no noisystudent needed"
    else:
        desc["load"] = "onnxruntime.InferenceSession(path); input 'images', output 'logits'"
    return desc
