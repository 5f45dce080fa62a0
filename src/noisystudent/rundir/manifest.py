"""The manifest: per stage its status, the inputs it read and the outputs it wrote, each output
with its size and sha256. A stage is done only while every output still verifies and every
input is unchanged (`Manifest.done`), so a stage whose inputs changed runs again."""

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

    def done(self, name: str) -> bool:
        """Done = marked done AND every output still there with its recorded size and sha256
        AND every input it read unchanged since."""
        if self.entry(name).get("status") != "done":
            return False
        return not self.verify(name) and not self.stale_inputs(name)

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
        **extra: Any,
    ) -> None:
        """Record a stage's status. With status "done", the outputs are written and fsynced
        already (atomic_write); their sizes and sha256 are recorded here, so a later check sees
        any output that went missing or changed. Under torchrun only rank 0 writes it."""
        if dist.rank() != 0:
            return
        m = self.read()
        entry = m["stages"].get(name, {})
        entry.update(status=status, time=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)
        if inputs is not None:
            entry["inputs"] = [self.rel(p) for p in inputs]
            entry["input_sha256"] = {
                self.rel(p): sha256_file(p) for p in inputs if Path(p).is_file()
            }
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
