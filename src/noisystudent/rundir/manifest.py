"""The manifest: per stage its status, the inputs it read (files with their sha256, image sets
with their fingerprint, see fingerprints.py) and the outputs it wrote, each with its size and
sha256. A stage is done only while every output still verifies and every input is unchanged
(`Manifest.stale`), so a stage whose inputs changed runs again, and one whose outputs were
damaged is re-made (its stage re-makes every output it records, never re-records one)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..errors import UserError
from .io import read_json, sha256_file, write_json

MANIFEST_VERSION = 1


class Manifest:
    """manifest.json of the run directory `root`. Paths are recorded relative to `root`."""

    def __init__(self, root: Path, path: Path):
        self.root, self.path = root, path

    def read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"version": MANIFEST_VERSION, "stages": {}}
        return read_json(self.path)

    def entry(self, name: str) -> dict[str, Any]:
        return self.read()["stages"].get(name) or {}

    def rel(self, p: str | Path) -> str:
        """`p` relative to the run directory, as the manifest records it."""
        p = Path(p)
        try:
            return str(p.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(p)

    def verify(self, name: str) -> list[str]:
        """Problems with stage `name`'s recorded outputs (missing, size or sha256 differs)."""
        problems = []
        for rel, rec in self.entry(name).get("outputs", {}).items():
            p = self.root / rel
            size, digest = (rec, None) if isinstance(rec, int) else (rec["size"], rec["sha256"])
            if not p.is_file():
                problems.append(f"{rel} is missing")
            elif p.stat().st_size != size:
                problems.append(f"{rel} has {p.stat().st_size} bytes, manifest says {size}")
            elif digest is not None and sha256_file(p) != digest:
                problems.append(f"{rel} differs from the manifest (sha256)")
        return problems

    def stale_inputs(self, name: str) -> list[str]:
        """Inputs of stage `name` that changed since it ran (another teacher, other pseudo
        labels): its outputs no longer follow from them."""
        out = []
        for rel, digest in self.entry(name).get("input_sha256", {}).items():
            p = self.root / rel
            if not p.is_file() or sha256_file(p) != digest:
                out.append(rel)
        return out

    def changed_data(self, name: str, data: dict[str, str]) -> list[str]:
        """The image sets among `data` ({"data:<set>": fingerprint}, as now) whose fingerprint
        differs from what stage `name` recorded (one recorded by a version that did not record
        them counts as changed)."""
        had = self.entry(name).get("data", {})
        return [k.split(":", 1)[-1] for k, v in data.items() if had.get(k) != v]

    def stale(self, name: str, data: dict[str, str] | None = None) -> str | None:
        """Why stage `name`, marked done, must run again (one line), or None while it is done:
        every output still there with its recorded size and sha256, every input file and every
        image set in `data` unchanged since. Also None for a stage not marked done."""
        entry = self.entry(name)
        if entry.get("status") != "done":
            return None
        if entry.get("stale_because"):
            return f"{entry['stale_because']} since {name} ran"
        changed = self.changed_data(name, data or {})
        if changed:
            return f"{' and '.join(changed)} data changed since {name} ran"
        files = self.stale_inputs(name)
        if files:
            return f"{files[0]} changed since {name} ran"
        problems = self.verify(name)
        if problems:
            return f"{problems[0]}"
        return None

    def done(self, name: str, data: dict[str, str] | None = None) -> bool:
        """Marked done and not stale (see `stale`)."""
        return self.entry(name).get("status") == "done" and self.stale(name, data) is None

    def output_record(self, path: str | Path) -> dict[str, Any] | None:
        """The manifest's {size, sha256} for a file some stage wrote, or None."""
        rel = self.rel(path)
        for entry in self.read()["stages"].values():
            rec = entry.get("outputs", {}).get(rel)
            if isinstance(rec, dict):
                return rec
        return None

    def mark(
        self,
        name: str,
        status: str,
        inputs: list[Path] | None = None,
        outputs: list[Path] | None = None,
        data: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        """Record a stage's status. With status "done", the outputs are written and fsynced
        already (atomic_write); their sizes and sha256 are recorded here, so a later check sees
        any output that went missing or changed. `data`: the fingerprints of the image sets the
        stage read ({"data:<set>": ...}). Under torchrun only rank 0 writes it."""
        if dist.rank() != 0:
            return
        m = self.read()
        entry = m["stages"].get(name, {})
        entry.pop("stale_because", None)
        entry.update(status=status, time=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)
        if inputs is not None:
            entry["inputs"] = [self.rel(p) for p in inputs]
            entry["input_sha256"] = {
                self.rel(p): sha256_file(p) for p in inputs if Path(p).is_file()
            }
        if data is not None:
            entry["data"] = dict(data)
        if outputs is not None:
            recs = {}
            for p in outputs:
                p = Path(p)
                if not p.is_file():
                    raise UserError(f"stage {name}: output '{p}' was not written; re-run the stage")
                recs[self.rel(p)] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
            entry["outputs"] = recs
        m["stages"][name] = entry
        write_json(self.path, m)

    def damaged_outputs(self, name: str) -> list[Path]:
        """Recorded outputs of stage `name` that are missing or no longer match their size and
        sha256: a stage that keeps some of its earlier outputs (pseudo-label shards) must
        re-make these instead of keeping them."""
        out = []
        for rel, rec in self.entry(name).get("outputs", {}).items():
            p = self.root / rel
            if isinstance(rec, int):
                rec = {"size": rec, "sha256": None}
            if (
                not p.is_file()
                or p.stat().st_size != rec["size"]
                or (rec["sha256"] is not None and sha256_file(p) != rec["sha256"])
            ):
                out.append(p)
        return out

    def invalidate(self, name: str, because: str) -> None:
        """Make stage `name` run again next time, saying `because` ("iter0/pseudo-label ran
        again"): for a stage whose inputs were re-made even where their bytes came out equal."""
        if dist.rank() != 0:
            return
        m = self.read()
        if name in m["stages"]:
            m["stages"][name]["stale_because"] = because
            write_json(self.path, m)

    def forget(self, name: str) -> bool:
        """Drop stage `name` from the manifest, so it runs again next time (its files stay until
        the stage rewrites them). Returns whether it was recorded."""
        if dist.rank() != 0:
            return False
        m = self.read()
        if m["stages"].pop(name, None) is None:
            return False
        write_json(self.path, m)
        return True
