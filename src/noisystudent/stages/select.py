"""Filter model i's pseudo labels by confidence and balance classes -> iter<i>/select (the
rows that train model i+1, and counts.json)."""

from __future__ import annotations

from typing import Any

import torch

from ..artifacts import read_counts
from ..config import Config
from ..data import hidden_labels
from ..errors import UserError
from ..inputs import Data
from ..rundir import RunDir, save_tensors, write_json
from ..selection import class_counts, reference_select_stream, select_pseudo_labels
from ..store import PseudoLabelStore, store_files


def require_pseudo_labels(run: RunDir, data: Data, i: int) -> None:
    """Model i's pseudo labels are read only while their stage is done: every shard as it was
    recorded, made from the unlabeled images as they are now."""
    stage = run.it(i).stage("pseudo-label")
    if not run.manifest.done(stage, data.read("unlabeled")):
        raise UserError(
            f"the pseudo labels in '{run.it(i).pseudo}' are missing, changed since they were "
            f"made, or were made from other unlabeled images; run `noisystudent pseudo-label "
            f"--iteration {i}` (or `noisystudent run`) first"
        )


def select_rows(store: PseudoLabelStore, s, seed: int) -> torch.Tensor:
    """The selected store rows (with repeats where a class is upsampled)."""
    c = store.num_classes
    if s.mode == "reference":
        # two streaming passes over the store (histogram, then selection): bounded memory
        def chunks():
            return ((a, ch["max_prob"], ch["pred"]) for a, ch in store.iter_chunks())

        parts = reference_select_stream(chunks, c, s.per_class, s.threshold, s.upsample,
                                        s.use_all, seed=seed)  # fmt: skip
        return torch.cat(list(parts))
    return select_pseudo_labels(store.max_prob, store.pred, c, s.threshold, s.balance,
                                s.per_class, seed=seed)  # fmt: skip


def select_stage(cfg: Config, run: RunDir, data: Data, i: int) -> dict[str, Any]:
    paths, name = run.it(i), run.it(i).stage("select")
    if run.stage_done(name):
        return read_counts(run, i)
    require_pseudo_labels(run, data, i)
    store = PseudoLabelStore.load(paths.pseudo)
    run.mark(name, "running")
    s, c = cfg.select, store.num_classes
    pred, conf = store.pred, store.max_prob
    rows = select_rows(store, s, cfg.seed + i)
    if len(rows) == 0:
        raise UserError(
            f"no pseudo label reaches select.threshold={s.threshold} (max confidence "
            f"{conf.max().item() if len(conf) else 0:.3f}); lower the threshold"
        )
    passed = conf >= s.threshold
    uniq = torch.unique(rows)
    # audit against the hidden labels, where the unlabeled images have them
    hidden = hidden_labels(data.unlabeled, store.index[uniq])
    known = hidden >= 0
    acc = (
        100.0 * (pred[uniq][known] == hidden[known]).float().mean().item() if known.any() else None
    )
    total = len(store)
    counts = {
        "classes": data.classes,
        "before": class_counts(pred, c).tolist(),
        "after_filter": class_counts(pred[passed], c).tolist(),
        "after": class_counts(pred[rows], c).tolist(),
        "total": total,
        "passed_filter": int(passed.sum()),
        "kept_unique": len(uniq),
        "selected_rows": len(rows),
        # one definition each (docs/method.md): the share whose confidence reached the
        # threshold, and the share of distinct images left after balancing
        "passed_filter_fraction": int(passed.sum()) / max(1, total),
        "kept_unique_fraction": len(uniq) / max(1, total),
        "pseudo_label_acc": acc,
        "threshold": s.threshold,
        "balance": s.balance,
    }
    save_tensors(paths.selected, {"rows": rows})
    write_json(paths.counts, counts)
    run.log(stage=name, event="select", passed_filter_fraction=counts["passed_filter_fraction"],
            kept_unique_fraction=counts["kept_unique_fraction"], pseudo_label_acc=acc)  # fmt: skip
    run.mark(name, "done", inputs=store_files(paths.pseudo, store.meta["shards"]),
             outputs=[paths.selected, paths.counts])  # fmt: skip
    return counts
