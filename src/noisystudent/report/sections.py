"""The report's sections about training and pseudo labels; each takes the run's files and
returns an HTML fragment. A missing input gives a short note; an unreadable one a UserError,
which the page shows in place of the section."""

from __future__ import annotations

from typing import Any

import numpy as np
import yaml

from ..errors import UserError
from ..rundir import read_json
from .parts import DPI, duration, esc, figure, img, note, num, pct, table
from .runfiles import RunFiles

MAX_SAMPLE_CLASSES = 10  # rows of the sample grid (classes beyond are listed, not drawn)
SAMPLES_PER_SIDE = 4  # most / least confident images shown per class
MAX_BAR_CLASSES = 40  # above this many classes, per-class counts are drawn as sorted lines
MAX_TICK_CLASSES = 30  # above this many classes, the confusion matrix has no class ticks


def _selection_brief(sel: Any) -> str:
    """One line for config.select (fields read with defaults: older run dirs lack newer keys)."""
    out = f"confidence ≥ {sel.threshold}; "
    mode = getattr(sel, "mode", "simple")
    if not sel.balance:
        return out + "not balanced"
    if mode == "reference" and getattr(sel, "use_all", False):
        return out + "every image above the threshold once (reference code, use-all)"
    out += f"balanced to {sel.per_class if sel.per_class else 'the mean'} per class"
    if mode == "reference":
        how = "reference code: per-class histogram thresholds, fractional copies"
        return (
            out + f" ({how}" + ("" if getattr(sel, "upsample", True) else ", no upsampling") + ")"
        )
    return out + f" ({mode}: top-K most confident, duplicates to fill)"


def section_config(run: RunFiles) -> str:
    cfg = run.cfg
    d = cfg.data
    data_desc = (
        f"built-in digits, {d.labels_per_class} labels per class"
        if d.dataset == "digits"
        else f"labeled {d.labeled}, unlabeled {d.unlabeled}, test {d.test}"
    )
    if run.data is not None:
        data_desc += (
            f" ({len(run.data.labeled)} labeled, {len(run.data.unlabeled)} unlabeled, "
            f"{len(run.data.test)} test images, {len(run.data.classes)} classes)"
        )
    sel = cfg.select
    general = [
        ["models (teacher → students)", " → ".join(cfg.models)],
        ["data", data_desc],
        ["image size", f"{d.image_size} px"],
        [
            "pseudo labels",
            f"{cfg.pseudo.mode}, temperature {cfg.pseudo.temperature}"
            + (f", top-{cfg.pseudo.topk} stored" if cfg.pseudo.topk else ""),
        ],
        ["selection", _selection_brief(sel)],
        ["seed", cfg.seed],
    ]
    train_keys = [
        ("epochs", "epochs"),
        ("batch_size", "labeled batch"),
        ("ratio", "unlabeled : labeled batch"),
        ("optimizer", "optimizer"),
        ("lr", "learning rate"),
        ("weight_decay", "weight decay"),
        ("warmup_epochs", "warm-up epochs"),
        ("label_smoothing", "label smoothing"),
        ("randaugment", "RandAugment"),
        ("drop_rate", "dropout"),
        ("drop_path_rate", "stochastic depth"),
        ("init", "initialisation"),
    ]

    def show(key: str, v: Any) -> str:
        if v is None:
            return "none (crop/flip only)" if key == "randaugment" else "model default"
        return str(v)

    rows = []
    for key, label in train_keys:
        t, s = getattr(cfg.teacher, key), getattr(cfg.student, key)
        if key in ("ratio", "init"):
            t = "–"  # the teacher trains on labeled data only, from scratch
            pre = getattr(cfg.teacher, "pretrained", None) if key == "init" else None
            if pre is not None:  # ... or warm-started (teacher.pretrained)
                t = "pretrained: timm's weights" if pre is True else f"pretrained: {pre}"
        rows.append([label, show(key, t) if t != "–" else t, show(key, s)])
    full = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return (
        '<div class="row"><div>'
        + table(["setting", "value"], general)
        + "</div><div>"
        + table(["training recipe", "teacher (iteration 0)", "students"], rows)
        + "</div></div>"
        + f"<details><summary>Full resolved config (config.yaml)</summary><pre>{esc(full)}</pre>"
        + "</details>"
    )


def section_iterations(run: RunFiles) -> str:
    if run.summary_error:
        raise UserError(run.summary_error)
    if not run.summary:
        return note("No iteration has finished yet (summary.json is missing or empty).")
    head = [
        "iter",
        "role",
        "model",
        "parameters",
        "test top-1",
        "test top-5",
        "pseudo-label acc*",
        "passed filter*",
        "kept unique*",
        "train wall time",
    ]
    rows = []
    for r in run.summary:
        params = r.get("params")
        passed, kept = num(r.get("passed_filter_fraction")), num(r.get("kept_unique_fraction"))
        rows.append(
            [
                r.get("iteration", "?"),
                r.get("role", ""),
                r.get("model", ""),
                f"{params:,}" if isinstance(params, int) else "–",
                pct(num(r.get("test_top1"))),
                pct(num(r.get("test_top5"))),
                pct(num(r.get("pseudo_label_acc"))),
                "–" if passed is None else f"{passed:.3f}",
                "–" if kept is None else f"{kept:.3f}",
                duration(r.get("wall_s")),
            ]
        )
    out = table(head, rows, num_cols={0, 3, 4, 5, 6, 7, 8, 9})
    out += note(
        "* of the pseudo labels the model was trained on (made by the previous iteration's "
        "teacher, without noise): accuracy of the kept ones against the unlabeled images' "
        "hidden labels where known; the fraction of unlabeled images whose confidence reached "
        "the threshold; and the fraction of distinct images left after class balancing."
    )
    pts = [(r.get("iteration"), num(r.get("test_top1"))) for r in run.summary]
    pts = [(i, v) for i, v in pts if isinstance(i, int) and v is not None]
    if len(pts) >= 2:
        fig = figure(6.0, 3.0)
        ax = fig.add_subplot()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        for i, v in pts:
            ax.annotate(f"{v:.1f}", (i, v), textcoords="offset points", xytext=(0, 6), ha="center")
        ax.set_xticks([p[0] for p in pts])
        ax.set_xticklabels([f"{p[0]}: {run.cfg.models[p[0]]}" for p in pts], fontsize=8)
        ax.set_xlabel("iteration: model")
        ax.set_ylabel("test top-1 accuracy (%)")
        ax.set_title("Test top-1 accuracy by iteration")
        ax.grid(alpha=0.3)
        out += img(fig, "test top-1 accuracy by iteration")
    return out


def _train_curves(events: list[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """stage -> {"step", "loss", "train_acc", "lr"}, one value per step (a step logged twice,
    as after a resume that re-ran part of an epoch, keeps its last value)."""
    by_stage: dict[str, dict[int, dict[str, Any]]] = {}
    for e in events:
        if e.get("event") != "train" or not isinstance(e.get("step"), int):
            continue
        by_stage.setdefault(str(e.get("stage", "?")), {})[e["step"]] = e
    out = {}
    for stage, recs in by_stage.items():
        steps = sorted(recs)
        cols = {"step": np.asarray(steps, dtype=float)}
        for k in ("loss", "train_acc", "lr", "epoch"):
            vals = [num(recs[s].get(k)) for s in steps]
            cols[k] = np.asarray([np.nan if v is None else v for v in vals], dtype=float)
        out[stage] = cols
    return out


def _stage_iteration(stage: str) -> int | None:
    head = stage.split("/", 1)[0]
    if head.startswith("iter") and head[4:].isdigit():
        return int(head[4:])
    return None


def section_training(run: RunFiles) -> str:
    curves = _train_curves(run.events)
    if not curves:
        return note("No training events in metrics.jsonl yet.")
    out = []
    if run.bad_metric_lines:
        out.append(
            note(f"{run.bad_metric_lines} unreadable line(s) in metrics.jsonl were skipped.")
        )
    evals = {str(e.get("stage")): e for e in run.events if e.get("event") == "eval"}
    order = sorted(curves, key=lambda s: (_stage_iteration(s) is None, _stage_iteration(s), s))
    for stage in order:
        c = curves[stage]
        i = _stage_iteration(stage)
        model = run.cfg.models[i] if i is not None and i < len(run.cfg.models) else "?"
        role = "teacher" if i == 0 else "student"
        fig = figure(12.0, 3.1)
        axes = fig.subplots(1, 3)
        loss_label = (
            "cross-entropy (nats)" if i == 0 else "CE(labeled) + w·CE(pseudo-labeled) (nats)"
        )
        axes[0].plot(c["step"], c["loss"], color="C0")
        axes[0].set_title("Training loss")
        axes[0].set_ylabel(loss_label)
        axes[1].plot(c["step"], c["train_acc"], color="C1", label="labeled batches (train)")
        ev = evals.get(run.it(i).stage("evaluate")) if i is not None else None
        top1 = num(ev.get("top1")) if ev else None
        if top1 is not None:
            axes[1].axhline(top1, color="C2", ls="--", label=f"final test top-1 {top1:.1f}%")
        axes[1].set_title("Accuracy")
        axes[1].set_ylabel("top-1 accuracy (%)")
        axes[1].legend(fontsize=8, loc="lower right")
        axes[2].plot(c["step"], c["lr"], color="C3")
        axes[2].set_title("Learning rate schedule")
        axes[2].set_ylabel("learning rate (per step)")
        axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        for ax in axes:
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{stage}: {role} {model}", fontsize=11)
        out.append(f"<h3>{esc(stage)}</h3>" + img(fig, f"training curves of {stage}"))
    return "\n".join(out)


def _load_store(run: RunFiles, i: int) -> Any:
    from ..store import PseudoLabelStore

    paths = run.it(i)
    if not paths.pseudo_meta.is_file():
        return None
    return PseudoLabelStore.load(paths.pseudo)


def _threshold(run: RunFiles, i: int) -> float:
    p = run.it(i).counts
    if p.is_file():
        t = num(read_json(p).get("threshold"))
        if t is not None:
            return t
    return run.cfg.select.threshold


def _reliability(ax: Any, conf: np.ndarray, correct: np.ndarray, threshold: float) -> None:
    """Pseudo-label accuracy per confidence bin (a reliability diagram), from hidden labels."""
    edges = np.linspace(0.0, 1.0, 11)
    b = np.clip(np.digitize(conf, edges) - 1, 0, 9)
    n = np.bincount(b, minlength=10)
    hits = np.bincount(b, weights=correct.astype(float), minlength=10)
    ok = n >= 5  # too few images make a bin's accuracy noise
    centers = (edges[:-1] + edges[1:]) / 2
    ax.plot([0, 100], [0, 100], color="0.6", ls=":", label="calibrated (accuracy = confidence)")
    if ok.any():
        ax.plot(100 * centers[ok], 100 * hits[ok] / n[ok], "o-", color="C2", label="pseudo labels")
    else:
        ax.text(50, 50, "no hidden labels", ha="center", va="center", color="0.4")
    ax.axvline(100 * threshold, color="k", ls="--")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 102)
    ax.set_xlabel("teacher confidence (%, bins of 10)")
    ax.set_ylabel("pseudo-label accuracy (%)")
    ax.set_title("Accuracy vs confidence (hidden labels)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)


def section_confidence(run: RunFiles) -> str:
    out = []
    for i in run.iterations:
        store = _load_store(run, i)
        if store is None:
            continue
        conf = store.max_prob.float().numpy()
        pred = store.pred.numpy()
        hidden = run.hidden_labels(store)
        known = hidden >= 0
        t = _threshold(run, i)
        bins = np.linspace(0.0, 1.0, 41)
        fig = figure(12.0, 3.6)
        ax, ax2 = fig.subplots(1, 2, width_ratios=[1.7, 1])
        if known.any():
            right = known & (pred == hidden)
            wrong = known & (pred != hidden)
            parts = [conf[right], conf[wrong]]
            labels = ["pseudo label correct", "pseudo label wrong"]
            colors = ["C2", "C3"]
            if (~known).any():
                parts.append(conf[~known])
                labels.append("no hidden label")
                colors.append("C7")
            ax.hist(parts, bins=bins, stacked=True, label=labels, color=colors)
        else:
            ax.hist(conf, bins=bins, color="C0", label="unlabeled images")
        ax.axvline(t, color="k", ls="--", label=f"selection threshold {t:g}")
        ax.set_xlim(0, 1)
        ax.set_xlabel("teacher confidence: max softmax probability (0–1)")
        ax.set_ylabel("unlabeled images (count)")
        ax.set_title(
            f"iter{i}: confidence of teacher {run.cfg.models[i]} on {len(conf):,} unlabeled images"
        )
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
        _reliability(ax2, conf[known], pred[known] == hidden[known], t)
        kept = float((conf >= t).mean()) if len(conf) else 0.0
        out.append(
            f"<h3>iter{i}</h3>"
            + img(fig, f"teacher confidence histogram, iteration {i}")
            + note(
                f"{kept:.1%} of the images reach the threshold; median confidence "
                f"{float(np.median(conf)) if len(conf) else 0:.3f}."
                + ("" if known.any() else " (no hidden labels: correctness unknown)")
            )
        )
    if not out:
        return note("No pseudo labels yet (iter<i>/pseudo).")
    return "\n".join(out)


def section_selection(run: RunFiles) -> str:
    out = []
    for i in run.iterations:
        p = run.it(i).counts
        if not p.is_file():
            continue
        c = read_json(p)
        before = np.asarray(c.get("before", []), dtype=float)
        filt = np.asarray(c.get("after_filter", []), dtype=float)
        after = np.asarray(c.get("after", []), dtype=float)
        n = len(before)
        if n == 0 or len(filt) != n or len(after) != n:
            out.append(note(f"'{p}' has no matching per-class counts.", "warn"))
            continue
        names = [str(x) for x in c.get("classes", [])] or [str(k) for k in range(n)]
        fig = figure(12.0 if n > 12 else 9.0, 3.6)
        ax = fig.add_subplot()
        series = [
            (before, "all pseudo labels (argmax)", "C7"),
            (filt, f"confidence ≥ {c.get('threshold', '?')}", "C0"),
            (after, "after balancing (rows, with duplicates)", "C1"),
        ]
        if n <= MAX_BAR_CLASSES:
            x, w = np.arange(n), 0.27
            for k, (v, label, color) in enumerate(series):
                ax.bar(x + (k - 1) * w, v, w, label=label, color=color)
            ax.set_xticks(x)
            ax.set_xticklabels(
                names, rotation=45 if n > 12 else 0, ha="right" if n > 12 else "center"
            )
            ax.set_xlabel("class (teacher's predicted label)")
        else:
            order = np.argsort(-before)
            for v, label, color in series:
                ax.plot(np.arange(n), v[order], label=label, color=color)
            ax.set_xlabel(f"class rank by pseudo-label count ({n} classes)")
        ax.set_ylabel("images per class (count)")
        ax.set_title(f"iter{i}: per-class pseudo labels of teacher {run.cfg.models[i]}")
        top = max(float(before.max()), float(filt.max()), float(after.max()), 1.0)
        ax.set_ylim(0, 1.22 * top)  # headroom: the legend sits above the bars, never on them
        ax.legend(fontsize=8, loc="upper center", ncol=3)
        ax.grid(alpha=0.3, axis="y")
        pf, kf = num(c.get("passed_filter_fraction")), num(c.get("kept_unique_fraction"))
        acc = num(c.get("pseudo_label_acc"))
        out.append(
            f"<h3>iter{i} → student iter{i + 1}</h3>"
            + img(fig, f"per-class counts, iteration {i}")
            + note(
                f"{c.get('passed_filter', '?')} of {c.get('total', '?')} images passed the "
                f"confidence filter"
                + ("" if pf is None else f" ({pf:.1%})")
                + f"; {c.get('kept_unique', '?')} distinct images kept after balancing"
                + ("" if kf is None else f" ({kf:.1%})")
                + f", {c.get('selected_rows', '?')} rows with duplicates"
                + ("" if acc is None else f"; accuracy of the kept pseudo labels {acc:.2f}%")
                + "."
            )
        )
    if not out:
        return note("No selection yet (iter<i>/select/counts.json).")
    return "\n".join(out)


TILE = 64  # px of one sample image in the grid (small images are enlarged, pixels kept sharp)
BORDER = 4  # px of the coloured frame: correct / wrong / unknown pseudo label
FRAME_COLORS = {"right": (26, 150, 65), "wrong": (215, 25, 28), "unknown": (160, 160, 160)}


def _tile(run: RunFiles, pos: int, frame: str, faded: bool) -> np.ndarray:
    """One framed (TILE + 2*BORDER)^2 RGB tile of unlabeled image `pos`."""
    from PIL import Image

    from ..data import resize_center

    img = run.data.unlabeled.image(pos)
    img = resize_center(img, min(img.size)) if img.size[0] != img.size[1] else img  # square
    resample = Image.NEAREST if img.size[0] <= TILE else Image.BILINEAR
    a = np.asarray(img.resize((TILE, TILE), resample), dtype=np.float32)
    if faded:
        a = 0.45 * a + 0.55 * 255.0
    out = np.empty((TILE + 2 * BORDER, TILE + 2 * BORDER, 3), dtype=np.float32)
    out[:] = FRAME_COLORS[frame]
    out[BORDER:-BORDER, BORDER:-BORDER] = a
    return out.astype(np.uint8)


def _sample_grid(run: RunFiles, i: int, store: Any) -> Any:
    """The sample figure of teacher i: one row per class, k most then k least confident (the
    store's rows point into the unlabeled set as loaded: checked by the caller).

    Drawn as one mosaic image with text on top (fast: no axes per image)."""
    k = SAMPLES_PER_SIDE
    conf = store.max_prob.float().numpy()
    pred = store.pred.numpy()
    hidden = run.hidden_labels(store)
    image_of = store.index.numpy()
    t = _threshold(run, i)
    classes = run.data.classes
    shown = list(range(min(len(classes), MAX_SAMPLE_CLASSES)))
    cell = TILE + 2 * BORDER
    gap_x, gap_y, mid = 8, 20, 36  # px: between tiles, above each tile (its text), between halves
    width = 2 * k * (cell + gap_x) + mid
    height = len(shown) * (cell + gap_y)
    mosaic = np.full((height, width, 3), 255, dtype=np.uint8)
    labels: list[tuple[float, float, str]] = []
    for r, c in enumerate(shown):
        idx = np.flatnonzero(pred == c)
        idx = idx[np.argsort(-conf[idx], kind="stable")]
        most = idx[:k]
        least = idx[max(k, len(idx) - k) :][::-1]  # lowest first; never repeats `most`
        y0 = r * (cell + gap_y) + gap_y
        for half, picks in ((0, most), (1, least)):
            if len(picks) == 0:
                x = half * (k * (cell + gap_x) + mid) + cell / 2
                labels.append((x, y0 + cell / 2, "none"))
            for j, row in enumerate(picks.tolist()):
                p = int(image_of[row])
                h = hidden[row]
                frame = "unknown" if h < 0 else ("right" if h == c else "wrong")
                x0 = half * (k * (cell + gap_x) + mid) + j * (cell + gap_x)
                mosaic[y0 : y0 + cell, x0 : x0 + cell] = _tile(run, p, frame, conf[row] < t)
                labels.append((x0 + cell / 2, y0 - 3, f"{conf[row]:.2f}"))
    fig = figure(width / DPI + 1.3, height / DPI + 0.9)
    ax = fig.add_subplot()
    ax.imshow(mosaic, interpolation="nearest")
    for x, y, s in labels:
        ax.text(x, y, s, ha="center", va="bottom" if s != "none" else "center", fontsize=8)
    ax.set_xticks([k * (cell + gap_x) / 2, k * (cell + gap_x) + mid + k * (cell + gap_x) / 2])
    ax.set_xticklabels(["most confident (highest first)", "least confident (lowest first)"])
    ax.xaxis.tick_top()
    ax.set_yticks([r * (cell + gap_y) + gap_y + cell / 2 for r in range(len(shown))])
    ax.set_yticklabels([str(classes[c]) for c in shown])
    ax.tick_params(length=0)
    ax.set_ylabel("class the teacher predicted")
    for s in ax.spines.values():
        s.set_visible(False)
    ax.set_title(
        f"iter{i}: pseudo labels of teacher {run.cfg.models[i]}, confidence above each image",
        fontsize=11,
    )
    return fig


def section_samples(run: RunFiles) -> str:
    stores = [(i, s) for i in run.iterations if (s := _load_store(run, i)) is not None]
    if not stores:
        return note("No pseudo labels yet (iter<i>/pseudo).")
    if run.data is None:
        return note(f"The unlabeled images could not be loaded: {run.data_error}", "warn")
    k = SAMPLES_PER_SIDE
    out = [
        note(
            f"Per class, the {k} images the teacher was most confident about and the {k} it was "
            f"least confident about, among the images it labeled as that class. Frame: green = "
            f"the pseudo label matches the image's hidden label, red = it does not, grey = no "
            f"hidden label. Faded: below the selection threshold (dropped before training)."
        )
    ]
    for i, store in stores:
        if not run.rows_match_images(store):
            out.append(
                f"<h3>iter{i}</h3>"
                + note(
                    f"The unlabeled images changed since teacher iter{i} labeled them (files "
                    f"added or removed): its pseudo labels no longer name these images; re-run "
                    f"the pipeline to label the current set.",
                    "warn",
                )
            )
            continue
        fig = _sample_grid(run, i, store)
        notes = []
        n_classes = len(run.data.classes)
        if n_classes > MAX_SAMPLE_CLASSES:
            notes.append(f"first {MAX_SAMPLE_CLASSES} of {n_classes} classes shown")
        out.append(
            f"<h3>iter{i}</h3>"
            + img(fig, f"sample pseudo-labeled images, iteration {i}")
            + (note("; ".join(notes) + ".") if notes else "")
        )
    return "\n".join(out)


def section_confusion(run: RunFiles) -> str:
    final = None
    for i in run.iterations:
        p = run.it(i).eval
        if p.is_file():
            final = (i, p)
    if final is None:
        return note("No model has been evaluated yet (iter<i>/eval.json).")
    i, p = final
    ev = read_json(p)
    if "labels" not in ev or "predictions" not in ev:
        return note(f"'{p}' has no labels/predictions (written by an older version).", "warn")
    y = np.asarray(ev["labels"], dtype=np.int64)
    yhat = np.asarray(ev["predictions"], dtype=np.int64)
    classes = run.data.classes if run.data is not None else None
    n = int(max(y.max(initial=-1), yhat.max(initial=-1)) + 1)
    if classes is not None:
        n = max(n, len(classes))
    names = [str(c) for c in classes] if classes is not None else [str(c) for c in range(n)]
    known = (y >= 0) & (yhat >= 0)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y[known], yhat[known]), 1)
    rows = cm.sum(1, keepdims=True)
    norm = 100.0 * cm / np.maximum(rows, 1)
    side = 6.0 if n <= 20 else 8.0
    fig = figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=100)
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label("share of the true class (%)")
    if n <= MAX_TICK_CLASSES:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(names, rotation=45 if n > 10 else 0, ha="right" if n > 10 else "center")
        ax.set_yticklabels(names)
    if n <= 15:
        for a in range(n):
            for b in range(n):
                if cm[a, b]:
                    ax.text(
                        b,
                        a,
                        str(cm[a, b]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if norm[a, b] > 60 else "black",
                    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    top1 = num(ev.get("top1"))
    ax.set_title(
        f"iter{i} {run.cfg.models[i]} on {len(y):,} test images"
        + ("" if top1 is None else f" (top-1 {top1:.2f}%)")
    )
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:8]
    pairs = [(int(f) // n, int(f) % n) for f in flat if off.flat[f] > 0]
    out = img(fig, f"confusion matrix of iteration {i}") + note(
        "Colour: share of each true class (row) predicted as each class; numbers: image counts."
        if n <= 15
        else "Colour: share of each true class (row) predicted as each class."
    )
    if pairs:
        out += "<h3>Most frequent confusions</h3>" + table(
            ["true class", "predicted as", "images", "share of true class"],
            [[names[a], names[b], int(cm[a, b]), pct(norm[a, b], 1)] for a, b in pairs],
            num_cols={2, 3},
        )
    return out
