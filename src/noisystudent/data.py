"""Image sets: class folders, unlabeled folders, split index files, the built-in digits set,
and the uint8 decode cache for small images.

An `ImageSet` is a list of images with a stable `uid` each (the path relative to its root),
an integer label per image (-1 where unknown: hidden labels of unlabeled images are kept only to
audit pseudo labels), and either file paths (decoded per access) or a uint8 array (N, H, W, 3).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
import warnings
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from . import distributed as dist
from .errors import UserError
from .progress import bar as progress_bar
from .rundir import atomic_write, write_json, write_text
from .tarshards import TarMember, is_tar, scan_tars

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SMALL_IMAGE_MAX = 64  # at or below this resolution, images are decoded once into a uint8 cache
# Pillow's default Image.MAX_IMAGE_PIXELS (1024 * 1024 * 1024 // 4 // 3), as a constant: Pillow
# itself only warns between 1x and 2x it and refuses above 2x; here (data.max_image_pixels) an
# image over the limit is unreadable, checked from the header before any pixel is decoded.
PIL_MAX_PIXELS = 89_478_485
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey image


@dataclass
class ImageSet:
    classes: list[str]
    uids: Sequence[str]  # a list, or an IndexColumn (read from an index file)
    labels: np.ndarray  # (N,) int64, -1 = unknown
    paths: Sequence[Path] | None = None  # file-backed
    array: np.ndarray | None = None  # (N, H, W, 3) uint8, memory-backed
    skipped: list[str] = field(default_factory=list)  # uids of unreadable files that were skipped
    # What to do with a file found unreadable while reading it (file-backed sets, read per access
    # in the DataLoader): None raises an error naming the file; a BadImageLog skips and counts.
    bad_log: BadImageLog | None = None
    # Images with more pixels than this are unreadable (data.max_image_pixels; None: no limit).
    # Kept on the set, so DataLoader workers (forked or spawned) apply the same limit.
    max_pixels: int | None = PIL_MAX_PIXELS
    # The folder the uids are relative to (an index file's root line), resolved; None for sets
    # in memory. Used to find the same files in two sets (`overlap`).
    root: str | None = None

    def __len__(self) -> int:
        return len(self.uids)

    def subset(self, idx: np.ndarray) -> ImageSet:
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(
            classes=self.classes,
            uids=take(self.uids, idx),
            labels=self.labels[idx],
            paths=None if self.paths is None else take(self.paths, idx),
            array=None if self.array is None else self.array[idx],
            bad_log=self.bad_log,
            max_pixels=self.max_pixels,
            root=self.root,
        )

    def image(self, i: int) -> Image.Image:
        if self.array is not None:
            return Image.fromarray(self.array[i])
        assert self.paths is not None
        return load_rgb(self.paths[i], self.max_pixels)


# ---------------------------------------------------------------------------------------------
# decoding
def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. 16-bit and 32-bit grayscale are scaled by their range,
    palette and alpha images are composited on white (transparent areas become background)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def load_rgb(path: str | Path, max_pixels: int | None = PIL_MAX_PIXELS) -> Image.Image:
    """Open an image file fully (so a truncated file fails here) and convert it to RGB.

    Any decoder failure (not an image, truncated, corrupt, more than `max_pixels` pixels, a
    missing file) becomes `BadImage` naming the file; only MemoryError passes. The pixel count
    is checked from the header (Image.open reads only that) before anything is decoded.
    `max_pixels=None`: no limit."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and (max_pixels is None or max_pixels >= 2 * limit):
        # Pillow refuses images over 2x its own process-wide limit inside Image.open; raise
        # that to the limit asked for (only ever up), so this limit is the one that decides.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x its limit; the check below decides instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path.open() if isinstance(path, TarMember) else path) as img:
                w, h = img.size
                if max_pixels is not None and w * h > max_pixels:
                    raise BadImage(_too_large(path, f"{w}x{h} = {w * h:,} pixels", max_pixels))
                img.load()
                return to_rgb(img)
    except (MemoryError, BadImage):
        raise
    except Image.DecompressionBombError:  # over 2x Pillow's limit, so over max_pixels too
        more = f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels"
        raise BadImage(_too_large(path, more, max_pixels)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Exception) as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise BadImage(f"cannot read image '{path}': {type(e).__name__}: {msg}") from None


class BadImage(UserError):
    pass


def _too_large(path: object, size: str, max_pixels: int | None) -> str:
    return (
        f"cannot read image '{path}': {size}, over data.max_image_pixels={max_pixels} "
        f"(raise it, or set it to null, to read such images)"
    )


class BadImageLog:
    """The unreadable images of one set and the policy for them.

    `skip=False`: the first one is an error naming the file and the option that skips it.
    `skip=True`: each is counted and listed (one uid a line) in `listing`; more than
    `max_fraction` of the set's `total` images stops the run with an error.
    """

    def __init__(
        self,
        what: str,
        total: int,
        skip: bool,
        max_fraction: float,
        listing: Path | None = None,
        option: str = "data.on_bad_image",
    ):
        self.what, self.total, self.skip = what, total, skip
        self.max_fraction, self.listing, self.option = max_fraction, listing, option
        self.uids: list[str] = []
        self._seen: set[str] = set()

    def __len__(self) -> int:
        return len(self.uids)

    def preload(self, valid: set[str]) -> None:
        """Take over the listing a previous (killed) process wrote, for uids still in the set."""
        if self.listing is not None and self.listing.is_file():
            for u in self.listing.read_text().splitlines():
                if u in valid and u not in self._seen:
                    self.uids.append(u)
                    self._seen.add(u)

    def add(self, uid: str, reason: str = "", write: bool = True, check: bool = True) -> None:
        """Record one unreadable image (raises per the policy; `check`: the limit too)."""
        if uid in self._seen:
            return
        if not self.skip:
            what = reason or f"cannot read image '{uid}'"
            raise UserError(
                f"{what} ({self.what} data); fix or remove the file, or set {self.option}=skip to skip unreadable images"
            )
        self.uids.append(uid)
        self._seen.add(uid)
        if write:
            self.write()
        if check:
            self.check()

    def check(self) -> None:
        if len(self.uids) > self.max_fraction * self.total:
            where = f" (listed in {self.listing})" if self.listing else ""
            raise UserError(
                f"{len(self.uids)} of {self.total} {self.what} images are unreadable{where}, more "
                f"than data.max_bad_fraction={self.max_fraction} allows; fix or remove the files, "
                f"or raise data.max_bad_fraction"
            )

    def write(self) -> None:
        if self.listing is None:
            return
        if self.uids:
            write_text(self.listing, "\n".join(self.uids) + "\n")
        else:
            self.listing.unlink(missing_ok=True)


def resize_center(img: Image.Image, size: int) -> Image.Image:
    """Eval view: resize the shorter side to `size`, then center-crop to size x size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------------------------------------
# scanning
def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def scan_class_folders(root: str | Path, what: str = "labeled") -> ImageSet:
    """torchvision ImageFolder layout: root/<class>/<image>; classes = sorted folder names."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{what} data folder '{root}' does not exist; check data.{what}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        key = f"; check data.{what}" if what in ("labeled", "test") else ""
        raise UserError(
            f"{what} data folder '{root}' has no class sub-folders; a classifier needs at least "
            f"two class folders, {root}/<class>/<image>{key}"
        )
    uids, labels, paths = [], [], []
    for ci, c in enumerate(classes):
        files = sorted(p for p in (root / c).rglob("*") if p.is_file() and _is_image(p))
        if not files:
            raise UserError(
                f"{what} class folder '{root / c}' holds no images; add some or remove the folder"
            )
        for p in files:
            uids.append(p.relative_to(root).as_posix())
            labels.append(ci)
            paths.append(p)
    labels_ = np.asarray(labels, dtype=np.int64)
    return ImageSet(classes, uids, labels_, paths=paths, root=os.path.realpath(root))


def scan_unlabeled(root: str | Path, classes: list[str]) -> ImageSet:
    """All images under root (recursively), including the image members of any uncompressed
    `.tar` shards there (WebDataset style, see tarshards.py); root may also be one .tar.
    uid = relative path (`shard.tar/member` for tar members). If an image sits under a folder
    named like a class, that class is kept as a hidden label for auditing pseudo labels only."""
    root = Path(root)
    if root.is_file() and is_tar(root):
        uids, paths = scan_tars(root, [root])
        cidx = {c: i for i, c in enumerate(classes)}
        labels = [cidx.get(m.name.split("/")[0], -1) if "/" in m.name else -1 for m in paths]
        labels_ = np.asarray(labels, dtype=np.int64)  # uids: "<archive name>/<member>"
        return ImageSet(classes, uids, labels_, paths=paths, root=os.path.realpath(root.parent))
    if not root.is_dir():
        raise UserError(f"unlabeled data folder '{root}' does not exist; check data.unlabeled")
    cidx = {c: i for i, c in enumerate(classes)}
    found = sorted(p for p in root.rglob("*") if p.is_file())
    files = [p for p in found if _is_image(p)]
    tar_uids, tar_members = scan_tars(root, [p for p in found if is_tar(p)])
    if not files and not tar_members:
        raise UserError(f"unlabeled data folder '{root}' holds no images")
    uids = [p.relative_to(root).as_posix() for p in files]
    # hidden label: the first folder of the path (of the member name inside a tar), if a class
    keys = uids + [m.name for m in tar_members]
    labels = [cidx.get(u.split("/")[0], -1) if "/" in u else -1 for u in keys]
    uids += tar_uids
    labels_ = np.asarray(labels, dtype=np.int64)
    paths = [*files, *tar_members]
    return ImageSet(classes, uids, labels_, paths=paths, root=os.path.realpath(root))


# ---------------------------------------------------------------------------------------------
# split index files (`noisystudent split`)
INDEX_HEADER = "# noisystudent index v1"


def write_index(
    path: Path, root: Path, classes: list[str], rows: Iterable[tuple[str, str]]
) -> None:
    """Write an index file atomically; `rows` (uid, class) are streamed, so it may be a generator
    over more images than fit in memory as strings."""

    def write(p: Path) -> None:
        with open(p, "w") as f:
            f.write(f"{INDEX_HEADER}\n# root: {root.resolve()}\n# classes: {json.dumps(classes)}\n")
            for uid, c in rows:
                f.write(f"{uid}\t{c}\n")

    atomic_write(path, write)


class IndexColumn(Sequence):
    """The uids of an index file, or their paths under `root`, read from the file per access.

    An index can list far more images than fit in memory as Python strings (~110 bytes an image
    with their Paths); this keeps 16 bytes an image (where its line starts and ends) and reads a
    line with `os.pread` when asked, so pseudo-labeling a 500k-image index holds no per-image
    strings. Picklable (the file is re-opened), so DataLoader workers get it as it is."""

    def __init__(self, path: Path, span: np.ndarray, root: Path | None = None):
        # span: (N, 2) int64 byte offsets [start, end) of each line; the file must not change
        self.path, self.span, self.root = Path(path), span, root
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self.span)

    def __getitem__(self, i):  # an int; a subset is `take`
        a, b = (int(v) for v in self.span[range(len(self))[i]])
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        uid = os.pread(self._fd, b - a, a).split(b"\t", 1)[0].decode()
        return uid if self.root is None else self.root / uid

    def take(self, idx: np.ndarray) -> IndexColumn:
        return IndexColumn(self.path, self.span[idx], self.root)

    def with_root(self, root: Path) -> IndexColumn:
        return IndexColumn(self.path, self.span, root)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def take(seq: Sequence, idx: np.ndarray) -> Sequence:
    """seq[idx] for a list or an IndexColumn (which stays one)."""
    return seq.take(idx) if isinstance(seq, IndexColumn) else [seq[i] for i in idx]


def hidden_labels(images: ImageSet, idx: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(len(idx),) int64: `images.labels[idx]`, the (hidden) label of each indexed image, -1
    where the set has none (its `labels` hold -1 for unknown). For auditing pseudo labels, e.g.
    `hidden_labels(unlabeled, store.index)`; array indexing only, no per-image Python objects."""
    if isinstance(idx, torch.Tensor):
        idx = idx.detach().cpu().numpy()
    idx = np.asarray(idx)
    if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(f"image indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    n = len(images.labels)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
        raise UserError(
            f"image index {bad} is outside the set of {n} images: the set changed since "
            f"these indices were made"
        )
    labels = np.asarray(images.labels, dtype=np.int64)
    return torch.from_numpy(labels[idx.astype(np.int64, copy=False)])


def read_index(path: str | Path, what: str) -> ImageSet:
    """An index file as an ImageSet whose uids and paths stay in the file (IndexColumn); the
    lines are streamed once here for their offsets and class labels."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} index file '{path}' does not exist; check data.{what}")
    with open(path, "rb") as f:
        head = [f.readline().decode(errors="replace").rstrip("\r\n") for _ in range(3)]
        if head[0] != INDEX_HEADER or not all(": " in h for h in head[1:]):
            raise UserError(
                f"'{path}' is not a noisystudent index file (made by `noisystudent split`)"
            )
        root = Path(head[1].split(": ", 1)[1])
        try:
            classes = json.loads(head[2].split(": ", 1)[1])
        except json.JSONDecodeError:
            raise UserError(
                f"'{path}' line 3 is not '# classes: [...]'; re-make the index"
            ) from None
        cidx = {c.encode(): i for i, c in enumerate(classes)}
        span, labels = array("q"), array("q")
        pos = f.tell()
        for n, line in enumerate(f, start=4):
            if line.strip():
                parts = line.rstrip(b"\r\n").split(b"\t")
                if len(parts) != 2:
                    raise UserError(f"'{path}' line {n} is not 'uid<TAB>class'; re-make the index")
                span.extend((pos, pos + len(parts[0])))
                labels.append(cidx.get(parts[1], -1))
            pos += len(line)
    uids = IndexColumn(path, np.frombuffer(span, dtype=np.int64).reshape(-1, 2).copy())
    labels_ = np.frombuffer(labels, dtype=np.int64).copy()
    return ImageSet(classes, uids, labels_, paths=uids.with_root(root), root=os.path.realpath(root))


def split_dataset(src: str | Path, out: str | Path, labels_per_class: int, seed: int = 0) -> dict:
    """Standard SSL protocol: N labels per class (seeded), the rest unlabeled (labels hidden, kept
    only to audit pseudo labels). Writes out/labeled.tsv, out/unlabeled.tsv, out/split.json."""
    full = scan_class_folders(src, "source")
    if len(full.classes) < 2:
        raise UserError(
            f"source folder '{src}' has 1 class folder ({full.classes[0]}); a classifier needs "
            f"at least two class folders, {src}/<class>/<image>"
        )
    rng = np.random.default_rng(seed)
    lab_idx = []
    for ci, c in enumerate(full.classes):
        idx = np.flatnonzero(full.labels == ci)
        if len(idx) < labels_per_class:
            raise UserError(
                f"class '{c}' in '{src}' has {len(idx)} images, fewer than --labels-per-class {labels_per_class}"
            )
        lab_idx.extend(rng.choice(idx, labels_per_class, replace=False).tolist())
    lab = np.zeros(len(full), dtype=bool)
    lab[lab_idx] = True
    out = Path(out)
    rows = lambda mask: [(full.uids[i], full.classes[full.labels[i]]) for i in np.flatnonzero(mask)]  # noqa: E731
    write_index(out / "labeled.tsv", Path(src), full.classes, rows(lab))
    write_index(out / "unlabeled.tsv", Path(src), full.classes, rows(~lab))
    info = {
        "source": str(Path(src).resolve()),
        "labels_per_class": labels_per_class,
        "seed": seed,
        "labeled": int(lab.sum()),
        "unlabeled": int((~lab).sum()),
        "classes": full.classes,
    }
    write_json(out / "split.json", info)
    return info


def load_set(spec: str | Path, what: str, classes: list[str] | None = None) -> ImageSet:
    """A class-folder dir, an index file, or (unlabeled only) any folder of images."""
    p = Path(spec)
    if what == "unlabeled" and p.is_file() and is_tar(p):  # one tar archive of images
        return scan_unlabeled(p, classes or [])
    if p.suffix == ".tsv" or p.is_file():
        s = read_index(p, what)
        if classes is not None and s.classes != classes:
            raise UserError(
                f"{what} index '{p}' has classes {s.classes}, but labeled data has {classes}"
            )
        return s
    if what == "unlabeled":
        return scan_unlabeled(p, classes or [])
    return scan_class_folders(p, what)


# ---------------------------------------------------------------------------------------------
# checks across the sets of a run (inputs.load_data)
def check_classes(s: ImageSet, spec: str | Path, what: str) -> None:
    """Labels a classifier can learn from: no index row of a class missing from the index's
    class list (it would be class -1), and (labeled set) images of at least two classes; one
    class would train a constant model that scores 100% on a test set of that class."""
    unknown = np.flatnonzero(s.labels < 0)
    if len(unknown):
        raise UserError(
            f"{what} index '{spec}' has {len(unknown)} rows whose class is not in its "
            f"'# classes:' line (first: '{s.uids[int(unknown[0])]}'); re-make it with "
            f"`noisystudent split` or fix data.{what}"
        )
    present = [s.classes[int(c)] for c in np.unique(s.labels)]
    if what == "labeled" and len(present) < 2:
        has = f"1 class ({present[0]})" if present else "no classes"
        raise UserError(
            f"labeled data '{spec}' has {has}; a classifier needs at least two class folders: "
            f"give data.labeled one sub-folder per class, <folder>/<class>/<image>"
        )


def uid_strings(s: ImageSet) -> Iterator[str]:
    """The uids of a set, streamed; an index file's are sliced from one mapping of the file
    instead of one read per uid."""
    u = s.uids
    if not isinstance(u, IndexColumn):
        yield from u
        return
    with open(u.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        for a, b in zip(u.span[:, 0].tolist(), u.span[:, 1].tolist(), strict=True):
            yield m[a:b].decode()


def overlap(a: ImageSet, b: ImageSet) -> int:
    """How many images of `a` are also in `b`: the same file, by resolved root + relative path
    (no image is read or hashed; a file reached through a symlink inside a set's folder counts
    as another file). Free when neither set's folder lies inside the other's (no file can be
    in both); else a set of path strings for the smaller set, the larger streamed past it."""
    if a.root is None or b.root is None or not len(a) or not len(b):
        return 0
    ra, rb = Path(a.root), Path(b.root)
    if not (ra.is_relative_to(rb) or rb.is_relative_to(ra)):
        return 0
    outer = ra if rb.is_relative_to(ra) else rb  # uids are compared relative to this folder
    small, big = (a, b) if len(a) <= len(b) else (b, a)
    ps, pb = ("" if x.root == str(outer) else f"{Path(str(x.root)).relative_to(outer).as_posix()}/"
              for x in (small, big))  # fmt: skip
    keys = {ps + u for u in uid_strings(small)} if ps else set(uid_strings(small))
    if pb:
        return sum(1 for u in uid_strings(big) if pb + u in keys)
    return sum(1 for u in uid_strings(big) if u in keys)


_warned: set[str] = set()


def warn_once(msg: str) -> None:
    """One line on stderr, from rank 0, once per process (data is loaded again by later stages)."""
    if msg not in _warned and dist.is_main():
        _warned.add(msg)
        print(f"noisystudent: warning: {msg}", file=sys.stderr, flush=True)


def check_sets(sets: dict[str, ImageSet], specs: dict[str, str]) -> None:
    """The same folder (or index file) as labeled and unlabeled data, or as labeled and test
    data, is an error. Files in more than one set (one folder inside another, an index and a
    folder over the same images) are a warning with the count, printed once.

    Overlapping images are KEPT in the unlabeled set: the teacher pseudo-labels them like the
    rest, so the student also sees a labeled image with its teacher's soft label. The paper says
    nothing about removing them and common SSL practice (FixMatch, UDA, MixMatch) uses the whole
    training set as unlabeled data; dropping them silently would change the set the user gave
    (and every stored image index). Test images in the labeled or unlabeled set are kept too:
    the warning says test accuracy is then optimistic."""
    real = {w: os.path.realpath(specs[w]) for w in ("labeled", "unlabeled", "test")}
    for other in ("unlabeled", "test"):
        if real[other] == real["labeled"]:
            why = {
                "unlabeled": "give a separate folder of unlabeled images (or index files made "
                "by `noisystudent split`)",
                "test": "test accuracy would count the images the teacher trained on; give a "
                "held-out folder",
            }[other]
            raise UserError(
                f"data.{other} '{specs[other]}' is the same folder as data.labeled; {why}"
            )
    lab, unl, test = sets["labeled"], sets["unlabeled"], sets["test"]
    if n := overlap(unl, lab):
        warn_once(
            f"{n} unlabeled images are also in data.labeled ('{specs['labeled']}'); they are "
            f"kept and pseudo-labeled too (remove them from data.unlabeled to avoid it)"
        )
    for other, s in (("labeled", lab), ("unlabeled", unl)):
        if n := overlap(test, s):
            warn_once(
                f"{n} test images are also in data.{other} ('{specs[other]}'), so test "
                f"accuracy is optimistic; use a held-out data.test"
            )


# ---------------------------------------------------------------------------------------------
# uint8 decode cache
def fingerprint(s: ImageSet, size: int, identity: str | None = None) -> str:
    """Identity of a file-backed set at a resolution: uids, sizes and mtimes of its files, and
    `identity` when given (a content fingerprint, which sees edits that keep size and mtime)."""
    h = hashlib.sha1(f"v1|{size}|".encode())
    if identity is not None:
        h.update(f"id{identity}|".encode())
    if s.max_pixels != PIL_MAX_PIXELS:  # another limit may keep other files (default: as before)
        h.update(f"px{s.max_pixels}|".encode())
    assert s.paths is not None
    for uid, p in zip(s.uids, s.paths, strict=True):
        try:
            st = os.stat(p)
            h.update(f"{uid}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{uid}|missing\n".encode())
    return h.hexdigest()[:16]


def decode_to_array(
    s: ImageSet,
    size: int,
    cache_dir: str | Path | None,
    what: str,
    skip_bad: bool,
    progress: bool = False,
    identity: str | None = None,
) -> ImageSet:
    """Decode every image once to the eval view at `size` and cache it as uint8 (N, size, size, 3).

    Unreadable files are skipped (and listed in `skipped`) when `skip_bad`, else an error naming the
    file. Re-runs with unchanged files load the cache instead of decoding again.
    """
    if s.array is not None:
        return s
    fp = fingerprint(s, size, identity)
    cache = Path(cache_dir) / f"{what}-{fp}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:  # never unpickle a cache file
                keep = z["keep"]
                arr = z["images"]
            ok = keep.dtype == bool and keep.shape == (len(s),) and arr.dtype == np.uint8
            if not ok or arr.shape != (int(keep.sum()), size, size, 3):
                raise ValueError("cache does not fit this set")
            out = s.subset(np.flatnonzero(keep))
            out.paths = None
            out.array = arr
            out.skipped = [u for u, k in zip(s.uids, keep, strict=True) if not k]
            return out
        except Exception:
            cache.unlink(missing_ok=True)  # a damaged cache is rebuilt, never trusted
    arr = np.zeros((len(s), size, size, 3), dtype=np.uint8)
    keep = np.ones(len(s), dtype=bool)
    it = progress_bar(range(len(s)), f"decode {what}", len(s), progress)
    for i in it:
        try:
            arr[i] = np.asarray(resize_center(s.image(i), size))
        except BadImage:
            if not skip_bad:
                raise
            keep[i] = False
    if cache is not None:

        def save(p: Path) -> None:
            with open(p, "wb") as f:
                np.savez(f, images=arr[keep], keep=keep)

        atomic_write(cache, save)
    out = s.subset(np.flatnonzero(keep))
    out.paths = None
    out.array = arr[keep]
    out.skipped = [u for u, k in zip(s.uids, keep, strict=True) if not k]
    return out


# ---------------------------------------------------------------------------------------------
# built-in dataset
def digits_sets(
    size: int, labels_per_class: int, seed: int = 0, test_fraction: float = 0.25
) -> tuple[ImageSet, ImageSet, ImageSet]:
    """scikit-learn's bundled handwritten digits (1,797 images, 8x8, 10 classes; nothing is
    downloaded), upscaled bilinearly to size x size RGB, split with a fixed seed into
    `labels_per_class` labeled images per class, a stratified held-out test set, and the rest
    as the unlabeled pool (its labels hidden, used only to audit pseudo labels)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images / 16.0 * 255.0).round().astype(np.uint8)  # (1797, 8, 8)
    up = np.stack(
        [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in imgs]
    )
    arr = np.repeat(up[..., None], 3, axis=3)
    y = d.target.astype(np.int64)
    classes = [str(c) for c in range(10)]
    uids = [f"digits/{i:04d}" for i in range(len(y))]
    rng = np.random.default_rng(seed)
    test, lab = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * test_fraction))
        test.extend(idx[:n_test])
        lab.extend(idx[n_test : n_test + labels_per_class])
    rest = np.setdiff1d(np.arange(len(y)), np.concatenate([test, lab]))
    full = ImageSet(classes, uids, y, array=arr)
    unl = full.subset(rest)
    return full.subset(np.sort(lab)), unl, full.subset(np.sort(test))
