"""Warm start: the first teacher's initial weights from pretrained ones (`teacher.pretrained`).

`true`: timm's own pretrained weights for a timm model name (timm downloads them or reads its
Hugging Face cache; its loader re-makes the classifier head for another class count). A path:
a local weights file, read without running code: safetensors, or a torch state dict / timm
checkpoint ({"state_dict": ...} or {"model": ...}, "module." prefixes of DataParallel/DDP and
"_orig_mod." of torch.compile removed) through `torch.load(weights_only=True)`. Its keys may
be the plain network's (timm, torchvision style) or noisystudent's `Classifier`'s ("net."
prefix: another run's model.safetensors).

Everything but the classifier head must match the model exactly (names and shapes; a missing
BatchNorm `num_batches_tracked` counter aside); the head is loaded when it fits and the classes
are not known to differ, else it keeps the fresh initialisation the model was built with.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .models import Classifier, create_model, head_modules, key_differences
from .rundir import sha256_file

_WRAPPERS = ("state_dict", "model")  # where timm / common training scripts keep the weights
_PREFIXES = ("module.", "_orig_mod.", "net.")  # DDP, torch.compile, noisystudent's Classifier
_WHAT = (
    "give a weights file (safetensors, a torch state dict, or a timm checkpoint), true for "
    "timm's own weights, or null for random initialisation"
)


def pretrained_teacher(name: str, classes: list[str], drop_rate: float | None,
                       drop_path_rate: float | None, spec: bool | str,
                       ) -> tuple[Classifier, dict[str, Any], list[Path]]:  # fmt: skip
    """The first teacher built and initialised from `spec` (teacher.pretrained): the model,
    the record of what was loaded (for model.json, the summary and the log), and the files
    read (the stage's inputs). The caller seeds torch first: the re-made head is seeded."""
    if spec is True:
        model, record = _timm_pretrained(name, classes, drop_rate, drop_path_rate)
        return model, record, []
    path = Path(str(spec)).expanduser()
    tensors, meta = read_weights(path)
    model = create_model(name, len(classes), drop_rate, drop_path_rate)
    loaded, reinit = load_into(model, tensors, path, name, classes, meta)
    record = {"source": str(spec), "sha256": sha256_file(path), "loaded": loaded,
              "reinitialised": reinit}  # fmt: skip
    return model, record, [path.resolve()]


def _timm_pretrained(name: str, classes: list[str], drop_rate: float | None,
                     drop_path_rate: float | None) -> tuple[Classifier, dict[str, Any]]:  # fmt: skip
    try:
        model = create_model(name, len(classes), drop_rate, drop_path_rate, pretrained=True)
    except UserError:
        raise
    except Exception as e:  # no network, no such weights, a damaged cache, ...
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(
            f"could not get timm's pretrained weights for '{name}' (teacher.pretrained=true): "
            f"{why}; the first use downloads them from the Hugging Face Hub (then its cache is "
            f"used), or give a local weights file (teacher.pretrained=PATH)"
        ) from None
    net = model.net
    cfg = getattr(net, "pretrained_cfg", None) or {}
    heads = head_keys(net)
    reinit = heads if cfg.get("num_classes") != len(classes) else []
    loaded = len([k for k in net.state_dict() if k not in reinit])
    tag = cfg.get("hf_hub_id") or ".".join(
        x for x in (cfg.get("architecture"), cfg.get("tag")) if x
    )
    record = {"source": "timm", "weights": tag or name, "loaded": loaded, "reinitialised": reinit}
    return model, record


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a weights file (prefixes removed) and its safetensors metadata ({} for a
    torch file). Anything else is a one-line UserError naming the file."""
    if not path.exists():
        raise UserError(f"teacher.pretrained: weights file '{path}' not found; {_WHAT}")
    if not path.is_file():
        raise UserError(f"teacher.pretrained: '{path}' is not a file; {_WHAT}")
    with open(path, "rb") as f:
        head = f.read(9)
    meta: dict[str, str] = {}
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then JSON
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                obj: Any = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as e:
            why = " ".join(str(e).split())[:120]
            raise UserError(
                f"teacher.pretrained: '{path}' is not a readable safetensors file ({why}); {_WHAT}"
            ) from None
    else:
        try:
            with warnings.catch_warnings():  # e.g. torch's note on pickle protocols: not ours
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            if "Unsupported global" in str(e):
                raise UserError(
                    f"teacher.pretrained: '{path}' holds pickled code or objects besides tensors, "
                    f"refused (weights are read with weights_only=True, so no code runs); save "
                    f"the weights alone: torch.save(model.state_dict(), PATH) or safetensors"
                ) from None
            if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                raise UserError(  # a bare pickle (pickle.dump): objects or a protocol torch refuses
                    f"teacher.pretrained: '{path}' is a pickle that torch's weights_only reader "
                    f"refuses (pickled objects or code, or pickle protocol {head[1]}), so nothing "
                    f"in it ran; save the weights with torch.save(model.state_dict(), PATH) or "
                    f"as safetensors"
                ) from None
            raise UserError(
                f"teacher.pretrained: '{path}' is not a weights file (neither safetensors nor a "
                f"torch state dict: {type(e).__name__}); {_WHAT}"
            ) from None
    return _state_dict(obj, path), meta


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a state dict or a checkpoint dict holding one."""
    if isinstance(obj, dict):
        for key in _WRAPPERS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        what = "an empty dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise UserError(
            f"teacher.pretrained: '{path}' holds {what}, not a state dict of tensors (or a "
            f"checkpoint with a 'state_dict' or 'model' entry); {_WHAT}"
        )
    other = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if other:
        raise UserError(
            f"teacher.pretrained: '{path}' holds no state dict: entries that are not tensors "
            f"({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}) and no 'state_dict' "
            f"or 'model' entry; {_WHAT}"
        )
    tensors = {str(k): v for k, v in obj.items()}
    changed = True
    while changed:  # "module.net.x", "_orig_mod.module.x", ...: peel every wrapper
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in tensors):
                tensors = {k[len(p) :]: v for k, v in tensors.items()}
                changed = True
    return tensors


def head_keys(net: torch.nn.Module) -> list[str]:
    """State-dict keys of the classifier head(s) of a plain network."""
    heads = head_modules(net)
    return [k for k in net.state_dict() if any(k == h or k.startswith(h + ".") for h in heads)]


def load_into(model: Classifier, tensors: dict[str, torch.Tensor], path: Path, name: str,
              classes: list[str], meta: dict[str, str]) -> tuple[int, list[str]]:  # fmt: skip
    """Copy `tensors` into `model.net`: every key outside the head must be there with its shape
    (else a UserError saying what differs); the head is copied when it fits and the file's
    classes (if it names them) are these. Returns (tensors loaded, head keys left as made)."""
    net = model.net
    want = net.state_dict()
    heads = set(head_keys(net))
    trunk = [k for k in want if k not in heads]
    missing = [k for k in trunk if k not in tensors and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in want]
    sizes = [k for k in trunk if k in tensors and tuple(tensors[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or sizes:
        arch = meta.get("name") if meta.get("format") == "noisystudent-model" else None
        made = f" (the file is noisystudent model '{arch}')" if arch and arch != name else ""
        raise UserError(
            f"teacher.pretrained: '{path}'{made} does not fit model '{name}' outside its "
            f"classifier head: {key_differences(missing, unexpected, sizes, tensors, want)}; use "
            f"weights of this architecture, or set models[0] to the file's"
        )
    file_classes = None
    if meta.get("format") == "noisystudent-model" and meta.get("classes"):
        try:
            file_classes = json.loads(meta["classes"])
        except ValueError:
            file_classes = None
    head_fits = all(k in tensors and tuple(tensors[k].shape) == tuple(want[k].shape) for k in heads)
    if file_classes is not None and file_classes != list(classes):
        head_fits = False  # same count, other classes (or order): the head would mislabel
    take = [k for k in want if k in tensors and (k not in heads or head_fits)]
    net.load_state_dict({k: tensors[k] for k in take}, strict=False)
    reinit = [] if head_fits else [k for k in want if k in heads]
    return len(take), reinit


def describe(record: dict[str, Any], num_classes: int) -> str:
    """One line: where the weights came from, what was loaded, what was re-made."""
    src = (
        f"timm's {record.get('weights')}" if record["source"] == "timm" else f"'{record['source']}'"
    )
    reinit = record["reinitialised"]
    head = (
        f"head re-initialised for {num_classes} classes ({', '.join(reinit)})"
        if reinit
        else "head loaded too (it fits these classes)"
    )
    return (
        f"teacher starts from pretrained weights {src}: {record['loaded']} tensors loaded, {head}"
    )
