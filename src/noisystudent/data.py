"""Image sets: class folders, unlabeled folders, split index files, the built-in digits set,
and the uint8 decode cache for small images.

An `ImageSet` is a list of images with a stable `uid` each (the path relative to its root),
an integer label per image (-1 where unknown: hidden labels of unlabeled images are kept only to
audit pseudo labels), and either file paths (decoded per access) or a uint8 array (N, H, W, 3).
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import UserError
from .progress import bar as progress_bar
from .rundir import atomic_write, write_json, write_text
from .tarshards import TarMember, is_tar, scan_tars

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SMALL_IMAGE_MAX = 64  # at or below this resolution, images are decoded once into a uint8 cache
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
        )

    def image(self, i: int) -> Image.Image:
        if self.array is not None:
            return Image.fromarray(self.array[i])
        assert self.paths is not None
        return load_rgb(self.paths[i])


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


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file fully (so a truncated file fails here) and convert it to RGB.

    Any decoder failure (not an image, truncated, corrupt, a decompression bomb over Pillow's
    pixel limit, a missing file) becomes `BadImage` naming the file; only MemoryError passes."""
    try:
        with Image.open(path.open() if isinstance(path, TarMember) else path) as img:
            img.load()
            return to_rgb(img)
    except MemoryError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Exception) as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise BadImage(f"cannot read image '{path}': {type(e).__name__}: {msg}") from None


class BadImage(UserError):
    pass


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
        raise UserError(
            f"{what} data folder '{root}' has no class sub-folders; expected {root}/<class>/<image>"
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
    return ImageSet(classes, uids, np.asarray(labels, dtype=np.int64), paths=paths)


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
        return ImageSet(classes, uids, np.asarray(labels, dtype=np.int64), paths=paths)
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
    return ImageSet(classes, uids, np.asarray(labels, dtype=np.int64), paths=[*files, *tar_members])


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
    return ImageSet(
        classes, uids, np.frombuffer(labels, dtype=np.int64).copy(), paths=uids.with_root(root)
    )


def split_dataset(src: str | Path, out: str | Path, labels_per_class: int, seed: int = 0) -> dict:
    """Standard SSL protocol: N labels per class (seeded), the rest unlabeled (labels hidden, kept
    only to audit pseudo labels). Writes out/labeled.tsv, out/unlabeled.tsv, out/split.json."""
    full = scan_class_folders(src, "source")
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
# uint8 decode cache
def fingerprint(s: ImageSet, size: int) -> str:
    """Identity of a file-backed set at a resolution: uids, sizes and mtimes of its files."""
    h = hashlib.sha1(f"v1|{size}|".encode())
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
) -> ImageSet:
    """Decode every image once to the eval view at `size` and cache it as uint8 (N, size, size, 3).

    Unreadable files are skipped (and listed in `skipped`) when `skip_bad`, else an error naming the
    file. Re-runs with unchanged files load the cache instead of decoding again.
    """
    if s.array is not None:
        return s
    fp = fingerprint(s, size)
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
