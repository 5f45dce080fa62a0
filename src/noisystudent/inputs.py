"""The run's images: the labeled, unlabeled and test sets the config describes, loaded once per
command, with the policy for unreadable files applied (data.on_bad_image, data.on_bad_labeled,
data.max_bad_fraction)."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import distributed as dist
from .config import Config
from .data import (
    SMALL_IMAGE_MAX,
    BadImage,
    BadImageLog,
    ImageSet,
    check_classes,
    check_sets,
    decode_to_array,
    digits_sets,
    load_set,
)
from .errors import UserError
from .fingerprints import set_fingerprint
from .rundir import RunDir


@dataclass
class Data:
    labeled: ImageSet
    unlabeled: ImageSet
    test: ImageSet
    size: int
    small: bool
    # set name -> its fingerprint as scanned (fingerprints.py): what stages record as read
    fingerprints: dict[str, str] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return self.labeled.classes

    def read(self, *sets: str) -> dict[str, str]:
        """The fingerprints of the named sets ("labeled", "unlabeled", "test"), for a stage's
        manifest entry: the stage runs again when one of them changes."""
        return {f"data:{w}": self.fingerprints[w] for w in sets}


def _bad_log(cfg: Config, run: RunDir, s: ImageSet, what: str) -> BadImageLog:
    """The policy for unreadable images of one set: unlabeled per data.on_bad_image, labeled and
    test per data.on_bad_labeled; skipped ones listed in <run_dir>/skipped_<what>.txt."""
    d = cfg.data
    option = "data.on_bad_image" if what == "unlabeled" else "data.on_bad_labeled"
    skip = (d.on_bad_image if what == "unlabeled" else d.on_bad_labeled) == "skip"
    listing = run.paths.skipped(what)
    return BadImageLog(what, len(s), skip, d.max_bad_fraction, listing, option)


def load_data(cfg: Config, run: RunDir) -> Data:
    """Labeled, unlabeled and test sets as the config describes; small images (<= 64 px)
    are decoded once into a uint8 cache, larger ones read per access.

    Unreadable images (not an image, truncated, corrupt): in the unlabeled set skipped, counted
    and listed in skipped_unlabeled.txt (data.on_bad_image=skip, the default); in labeled or test
    data an error naming the file (data.on_bad_labeled=skip skips them too). Skipping more than
    data.max_bad_fraction of a set stops the run. Small images are all checked here; large ones
    when first read (a DataLoader worker marks the file, the main process applies the policy)."""
    d, size = cfg.data, cfg.data.image_size
    if d.max_image_pixels is not None and d.max_image_pixels < 1:
        raise UserError("config key 'data.max_image_pixels' must be >= 1, or null for no limit")
    if d.dataset == "digits":
        lab, unl, test = digits_sets(size, d.labels_per_class, seed=cfg.seed)
        fps = {w: set_fingerprint(s, None, d.fingerprint)
               for w, s in (("labeled", lab), ("unlabeled", unl), ("test", test))}  # fmt: skip
        return Data(lab, unl, test, size, small=True, fingerprints=fps)
    for key in ("labeled", "unlabeled", "test"):
        if getattr(d, key) is None:
            raise UserError(
                f"config key 'data.{key}' is not set; give a folder (or data.dataset=digits)"
            )
    lab = load_set(d.labeled, "labeled")
    check_classes(lab, d.labeled, "labeled")  # at least two classes
    test = load_set(d.test, "test")
    check_classes(test, d.test, "test")
    if test.classes != lab.classes:
        only_l = sorted(set(lab.classes) - set(test.classes))
        only_t = sorted(set(test.classes) - set(lab.classes))
        raise UserError(
            f"test classes differ from labeled classes (only in labeled: {only_l}, only in "
            f"test: {only_t}); data.test must have the same class folders as data.labeled"
        )
    unl = load_set(d.unlabeled, "unlabeled", lab.classes)
    small = size <= SMALL_IMAGE_MAX
    sets = {"labeled": lab, "test": test, "unlabeled": unl}
    check_sets(sets, {w: getattr(d, w) for w in sets})  # same folder: error; overlap: warning
    for s in sets.values():
        s.max_pixels = d.max_image_pixels  # over it: unreadable (travels to DataLoader workers)
    # as scanned, before decoding: the files' listing, not the decoded pixels
    fps = {w: set_fingerprint(s, getattr(d, w), d.fingerprint) for w, s in sets.items()}
    for what, s in list(sets.items()):
        log = _bad_log(cfg, run, s, what)
        if small:
            cache = run.paths.decode_cache(d.cache_dir)
            try:
                # content mode: the cache is keyed by the files' bytes too, like the stages
                ident = fps[what] if d.fingerprint == "content" else None
                s = decode_to_array(s, size, cache, what, skip_bad=log.skip, progress=cfg.progress,
                                    identity=ident)  # fmt: skip
            except BadImage as e:
                raise UserError(
                    f"{e} ({what} data); fix or remove the file, or set {log.option}=skip to "
                    f"skip unreadable images"
                ) from None
            for u in s.skipped:
                log.add(u, write=False, check=False)
            log.write()  # also removes a listing a fixed set no longer needs
            log.check()
            if s.skipped and dist.is_main():
                print(
                    f"skipped {len(s.skipped)} unreadable {what} images (listed in {log.listing})"
                )
        else:
            log.preload(set(s.uids))  # found by a previous, interrupted process
        s.bad_log = log
        if len(s) == 0:
            raise UserError(f"no readable images in {what} data '{getattr(d, what)}'")
        sets[what] = s
    return Data(sets["labeled"], sets["unlabeled"], sets["test"], size, small, fps)
