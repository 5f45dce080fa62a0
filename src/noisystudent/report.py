"""The run report: the pictures a user wants to look at, in one self-contained HTML page.

    noisystudent report RUN_DIR        (re)writes RUN_DIR/report.html; the pipeline does it too

Sections, each read from the run directory only (it never changes what a stage wrote):
the resolved config in brief; one row per iteration (model, parameters, test top-1/top-5,
pseudo-label accuracy, kept fraction, wall time); training curves (loss, accuracy, learning rate)
per stage; teacher-confidence histograms; per-class counts before and after selection; sample
pseudo-labeled images (most and least confident per class); the final model's confusion matrix;
robustness (iter<i>/robustness/results.json) when present.

Every picture is a PNG embedded as a `data:` URI, so the page opens offline and stays whole when
copied or mailed as one file. Plots are drawn on matplotlib's Agg canvas directly (no pyplot, no
global backend switch, no display needed). A section whose inputs are missing or unreadable says
so in the page instead of failing the whole report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import __version__
from .config import Config, load_config
from .errors import UserError
from .rundir import read_json, write_text

REPORT_NAME = "report.html"
DPI = 100  # figures are sized in inches for a ~1200 px wide page: 12 in -> 1200 px
MAX_SAMPLE_CLASSES = 10  # rows of the sample grid (classes beyond are listed, not drawn)
SAMPLES_PER_SIDE = 4  # most / least confident images shown per class
MAX_BAR_CLASSES = 40  # above this many classes, per-class counts are drawn as sorted lines
MAX_TICK_CLASSES = 30  # above this many classes, the confusion matrix has no class ticks

# (section id, title) in page order; the test checks that every one is present
SECTIONS = [
    ("config", "Configuration"),
    ("iterations", "Iterations"),
    ("training", "Training curves"),
    ("confidence", "Teacher confidence"),
    ("selection", "Selection: per-class counts"),
    ("samples", "Sample pseudo-labeled images"),
    ("confusion", "Confusion matrix"),
    ("robustness", "Robustness"),
]


def report_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / REPORT_NAME


@dataclass
class Report:
    path: Path  # RUN_DIR/report.html
    problems: list[str]  # sections that could not be drawn, one line each


# --------------------------------------------------------------------------------------------
# reading the run directory
@dataclass
class _Run:
    """What the sections read: the run's files, loaded once."""

    root: Path
    cfg: Config
    summary: list[dict[str, Any]]
    events: list[dict[str, Any]]
    bad_metric_lines: int
    data: Any = None  # stages.Data, or None when the images could not be loaded
    data_error: str | None = None
    problems: list[str] = field(default_factory=list)  # section-level problems, for the caller

    @property
    def iterations(self) -> list[int]:
        """Iterations with a directory on disk, in order (a model may not be trained yet)."""
        return [i for i in range(len(self.cfg.models)) if (self.root / f"iter{i}").is_dir()]

    def iter_dir(self, i: int) -> Path:
        return self.root / f"iter{i}"

    def hidden_labels(self, uids: list[str]) -> np.ndarray:
        """(N,) hidden labels of the unlabeled images with these uids; -1 where unknown."""
        out = np.full(len(uids), -1, dtype=np.int64)
        if self.data is None:
            return out
        unl = self.data.unlabeled
        pos = {u: k for k, u in enumerate(unl.uids)}
        for j, u in enumerate(uids):
            k = pos.get(u)
            if k is not None:
                out[j] = unl.labels[k]
        return out


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """metrics.jsonl -> (records, number of unreadable lines). A line cut short by a killed run
    is skipped, never fatal."""
    if not path.is_file():
        return [], 0
    out, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            out.append(rec)
        else:
            bad += 1
    return out, bad


def _open_run(run_dir: str | Path, cfg: Config | None, data: Any) -> _Run:
    root = Path(run_dir)
    if not root.is_dir():
        raise UserError(f"run directory '{root}' does not exist")
    if not (root / "config.yaml").is_file():
        raise UserError(
            f"'{root}' is not a run directory (no config.yaml); pass the run_dir of a "
            f"`noisystudent run` or `noisystudent demo`"
        )
    if cfg is None:
        cfg = load_config(root)
    summary_path = root / "summary.json"
    summary = []
    if summary_path.is_file():
        s = read_json(summary_path)
        if not isinstance(s, dict) or not isinstance(s.get("iterations"), list):
            raise UserError(f"'{summary_path}' has no 'iterations' list; delete it and re-run")
        summary = s["iterations"]
    events, bad = read_metrics(root / "metrics.jsonl")
    run = _Run(root, cfg, summary, events, bad, data)
    if run.data is None:
        try:
            from .rundir import RunDir
            from .stages import load_data

            run.data = load_data(cfg, RunDir(root))
        except UserError as e:
            run.data_error = str(e)
    return run


# --------------------------------------------------------------------------------------------
# figures and HTML pieces
def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _img(fig: Any, alt: str) -> str:
    """A figure as an embedded PNG <img>; the figure's memory is released."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    w, h = (fig.get_size_inches() * DPI).round().astype(int)
    fig.clear()
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" width="{w}" height="{h}" '
        f'alt="{html.escape(alt)}"></figure>'
    )


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _note(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{_esc(text)}</p>'


def _pct(v: Any, digits: int = 2) -> str:
    return "–" if v is None else f"{float(v):.{digits}f}%"


def _num(v: Any) -> float | None:
    """A finite float, or None (missing, null, NaN, or not a number)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _duration(s: Any) -> str:
    s = _num(s)
    if s is None:
        return "–"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {sec:02d} s"


def _table(head: list[str], rows: list[list[Any]], num_cols: set[int] | None = None) -> str:
    num_cols = num_cols or set()

    def cell(tag: str, j: int, v: Any) -> str:
        cls = ' class="num"' if j in num_cols else ""
        return f"<{tag}{cls}>{_esc(v)}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell("th", j, h) for j, h in enumerate(head)) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(cell("td", j, v) for j, v in enumerate(r)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# sections: each returns an HTML fragment
def section_config(run: _Run) -> str:
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
        [
            "selection",
            f"confidence ≥ {sel.threshold}; "
            + (
                f"balanced to {sel.per_class if sel.per_class else 'the mean'} per class"
                if sel.balance
                else "not balanced"
            ),
        ],
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
        rows.append([label, show(key, t) if t != "–" else t, show(key, s)])
    full = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return (
        '<div class="row"><div>'
        + _table(["setting", "value"], general)
        + "</div><div>"
        + _table(["training recipe", "teacher (iteration 0)", "students"], rows)
        + "</div></div>"
        + f"<details><summary>Full resolved config (config.yaml)</summary><pre>{_esc(full)}</pre>"
        + "</details>"
    )


def section_iterations(run: _Run) -> str:
    if not run.summary:
        return _note("No iteration has finished yet (summary.json is missing or empty).")
    head = [
        "iter",
        "role",
        "model",
        "parameters",
        "test top-1",
        "test top-5",
        "pseudo-label acc*",
        "kept fraction*",
        "train wall time",
    ]
    rows = []
    for r in run.summary:
        params = r.get("params")
        kept = _num(r.get("kept_fraction"))
        rows.append(
            [
                r.get("iteration", "?"),
                r.get("role", ""),
                r.get("model", ""),
                f"{params:,}" if isinstance(params, int) else "–",
                _pct(_num(r.get("test_top1"))),
                _pct(_num(r.get("test_top5"))),
                _pct(_num(r.get("pseudo_label_acc"))),
                "–" if kept is None else f"{kept:.3f}",
                _duration(r.get("wall_s")),
            ]
        )
    out = _table(head, rows, num_cols={0, 3, 4, 5, 6, 7, 8})
    out += _note(
        "* of the pseudo labels the model was trained on (made by the previous iteration's "
        "teacher, without noise): accuracy against the unlabeled images' hidden labels where "
        "known, and the fraction of unlabeled images kept by the confidence filter."
    )
    pts = [(r.get("iteration"), _num(r.get("test_top1"))) for r in run.summary]
    pts = [(i, v) for i, v in pts if isinstance(i, int) and v is not None]
    if len(pts) >= 2:
        fig = _figure(6.0, 3.0)
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
        out += _img(fig, "test top-1 accuracy by iteration")
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
            vals = [_num(recs[s].get(k)) for s in steps]
            cols[k] = np.asarray([np.nan if v is None else v for v in vals], dtype=float)
        out[stage] = cols
    return out


def _stage_iteration(stage: str) -> int | None:
    head = stage.split("/", 1)[0]
    if head.startswith("iter") and head[4:].isdigit():
        return int(head[4:])
    return None


def section_training(run: _Run) -> str:
    curves = _train_curves(run.events)
    if not curves:
        return _note("No training events in metrics.jsonl yet.")
    out = []
    if run.bad_metric_lines:
        out.append(
            _note(f"{run.bad_metric_lines} unreadable line(s) in metrics.jsonl were skipped.")
        )
    evals = {str(e.get("stage")): e for e in run.events if e.get("event") == "eval"}
    order = sorted(curves, key=lambda s: (_stage_iteration(s) is None, _stage_iteration(s), s))
    for stage in order:
        c = curves[stage]
        i = _stage_iteration(stage)
        model = run.cfg.models[i] if i is not None and i < len(run.cfg.models) else "?"
        role = "teacher" if i == 0 else "student"
        fig = _figure(12.0, 3.1)
        axes = fig.subplots(1, 3)
        loss_label = (
            "cross-entropy (nats)" if i == 0 else "CE(labeled) + w·CE(pseudo-labeled) (nats)"
        )
        axes[0].plot(c["step"], c["loss"], color="C0")
        axes[0].set_title("Training loss")
        axes[0].set_ylabel(loss_label)
        axes[1].plot(c["step"], c["train_acc"], color="C1", label="labeled batches (train)")
        ev = evals.get(f"iter{i}/evaluate") if i is not None else None
        top1 = _num(ev.get("top1")) if ev else None
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
        out.append(f"<h3>{_esc(stage)}</h3>" + _img(fig, f"training curves of {stage}"))
    return "\n".join(out)


def _load_store(run: _Run, i: int) -> Any:
    from .store import PseudoLabelStore

    root = run.iter_dir(i) / "pseudo"
    if not (root / "meta.json").is_file():
        return None
    return PseudoLabelStore.load(root)


def _threshold(run: _Run, i: int) -> float:
    p = run.iter_dir(i) / "select" / "counts.json"
    if p.is_file():
        t = _num(read_json(p).get("threshold"))
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
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)


def section_confidence(run: _Run) -> str:
    out = []
    for i in run.iterations:
        store = _load_store(run, i)
        if store is None:
            continue
        conf = store.max_prob.float().numpy()
        pred = store.pred.numpy()
        hidden = run.hidden_labels(store.uids)
        known = hidden >= 0
        t = _threshold(run, i)
        bins = np.linspace(0.0, 1.0, 41)
        fig = _figure(12.0, 3.6)
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
        ax.set_xlabel("teacher confidence: max softmax probability")
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
            + _img(fig, f"teacher confidence histogram, iteration {i}")
            + _note(
                f"{kept:.1%} of the images reach the threshold; median confidence "
                f"{float(np.median(conf)) if len(conf) else 0:.3f}."
                + ("" if known.any() else " (no hidden labels: correctness unknown)")
            )
        )
    if not out:
        return _note("No pseudo labels yet (iter<i>/pseudo).")
    return "\n".join(out)


def section_selection(run: _Run) -> str:
    out = []
    for i in run.iterations:
        p = run.iter_dir(i) / "select" / "counts.json"
        if not p.is_file():
            continue
        c = read_json(p)
        before = np.asarray(c.get("before", []), dtype=float)
        filt = np.asarray(c.get("after_filter", []), dtype=float)
        after = np.asarray(c.get("after", []), dtype=float)
        n = len(before)
        if n == 0 or len(filt) != n or len(after) != n:
            out.append(_note(f"'{p}' has no matching per-class counts.", "warn"))
            continue
        names = [str(x) for x in c.get("classes", [])] or [str(k) for k in range(n)]
        fig = _figure(12.0 if n > 12 else 9.0, 3.6)
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
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        kf = _num(c.get("kept_fraction"))
        acc = _num(c.get("pseudo_label_acc"))
        out.append(
            f"<h3>iter{i} → student iter{i + 1}</h3>"
            + _img(fig, f"per-class counts, iteration {i}")
            + _note(
                f"kept {c.get('kept_unique', '?')} of {c.get('total', '?')} images"
                + ("" if kf is None else f" ({kf:.1%})")
                + f", {c.get('selected_rows', '?')} rows after balancing"
                + ("" if acc is None else f"; accuracy of the kept pseudo labels {acc:.2f}%")
                + "."
            )
        )
    if not out:
        return _note("No selection yet (iter<i>/select/counts.json).")
    return "\n".join(out)


TILE = 64  # px of one sample image in the grid (small images are enlarged, pixels kept sharp)
BORDER = 4  # px of the coloured frame: correct / wrong / unknown pseudo label
FRAME_COLORS = {"right": (26, 150, 65), "wrong": (215, 25, 28), "unknown": (160, 160, 160)}


def _tile(run: _Run, pos: int, frame: str, faded: bool) -> np.ndarray:
    """One framed (TILE + 2*BORDER)^2 RGB tile of unlabeled image `pos`."""
    from PIL import Image

    from .data import resize_center

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


def _sample_grid(run: _Run, i: int, store: Any, pos: dict[str, int]) -> tuple[Any, int]:
    """The sample figure of teacher i: one row per class, k most then k least confident.

    Drawn as one mosaic image with text on top (fast: no axes per image). Returns (figure,
    number of store rows whose image is no longer in the unlabeled set)."""
    k = SAMPLES_PER_SIDE
    conf = store.max_prob.float().numpy()
    pred = store.pred.numpy()
    hidden = run.hidden_labels(store.uids)
    t = _threshold(run, i)
    classes = run.data.classes
    shown = list(range(min(len(classes), MAX_SAMPLE_CLASSES)))
    cell = TILE + 2 * BORDER
    gap_x, gap_y, mid = 8, 20, 36  # px: between tiles, above each tile (its text), between halves
    width = 2 * k * (cell + gap_x) + mid
    height = len(shown) * (cell + gap_y)
    mosaic = np.full((height, width, 3), 255, dtype=np.uint8)
    labels: list[tuple[float, float, str]] = []
    missing = 0
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
                p = pos.get(store.uids[row])
                if p is None:
                    missing += 1
                    continue
                h = hidden[row]
                frame = "unknown" if h < 0 else ("right" if h == c else "wrong")
                x0 = half * (k * (cell + gap_x) + mid) + j * (cell + gap_x)
                mosaic[y0 : y0 + cell, x0 : x0 + cell] = _tile(run, p, frame, conf[row] < t)
                labels.append((x0 + cell / 2, y0 - 3, f"{conf[row]:.2f}"))
    fig = _figure(width / DPI + 1.3, height / DPI + 0.9)
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
    return fig, missing


def section_samples(run: _Run) -> str:
    stores = [(i, s) for i in run.iterations if (s := _load_store(run, i)) is not None]
    if not stores:
        return _note("No pseudo labels yet (iter<i>/pseudo).")
    if run.data is None:
        return _note(f"The unlabeled images could not be loaded: {run.data_error}", "warn")
    pos = {u: k for k, u in enumerate(run.data.unlabeled.uids)}
    k = SAMPLES_PER_SIDE
    out = [
        _note(
            f"Per class, the {k} images the teacher was most confident about and the {k} it was "
            f"least confident about, among the images it labeled as that class. Frame: green = "
            f"the pseudo label matches the image's hidden label, red = it does not, grey = no "
            f"hidden label. Faded: below the selection threshold (dropped before training)."
        )
    ]
    for i, store in stores:
        fig, missing = _sample_grid(run, i, store, pos)
        notes = []
        n_classes = len(run.data.classes)
        if n_classes > MAX_SAMPLE_CLASSES:
            notes.append(f"first {MAX_SAMPLE_CLASSES} of {n_classes} classes shown")
        if missing:
            notes.append(f"{missing} image(s) no longer in the unlabeled set")
        out.append(
            f"<h3>iter{i}</h3>"
            + _img(fig, f"sample pseudo-labeled images, iteration {i}")
            + (_note("; ".join(notes) + ".") if notes else "")
        )
    return "\n".join(out)


def section_confusion(run: _Run) -> str:
    final = None
    for i in run.iterations:
        p = run.iter_dir(i) / "eval.json"
        if p.is_file():
            final = (i, p)
    if final is None:
        return _note("No model has been evaluated yet (iter<i>/eval.json).")
    i, p = final
    ev = read_json(p)
    if "labels" not in ev or "predictions" not in ev:
        return _note(f"'{p}' has no labels/predictions (written by an older version).", "warn")
    y = np.asarray(ev["labels"], dtype=np.int64)
    yhat = np.asarray(ev["predictions"], dtype=np.int64)
    classes = run.data.classes if run.data is not None else None
    n = int(max(y.max(initial=-1), yhat.max(initial=-1)) + 1)
    if classes is not None:
        n = max(n, len(classes))
    names = [str(c) for c in classes] if classes is not None else [str(c) for c in range(n)]
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y, yhat), 1)
    rows = cm.sum(1, keepdims=True)
    norm = 100.0 * cm / np.maximum(rows, 1)
    side = 6.0 if n <= 20 else 8.0
    fig = _figure(side + 1.2, side)
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
    top1 = _num(ev.get("top1"))
    ax.set_title(
        f"iter{i} {run.cfg.models[i]} on {len(y):,} test images"
        + ("" if top1 is None else f" (top-1 {top1:.2f}%)")
    )
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:8]
    pairs = [(int(f) // n, int(f) % n) for f in flat if off.flat[f] > 0]
    out = _img(fig, f"confusion matrix of iteration {i}") + _note(
        "Colour: share of each true class (row) predicted as each class; numbers: image counts."
        if n <= 15
        else "Colour: share of each true class (row) predicted as each class."
    )
    if pairs:
        out += "<h3>Most frequent confusions</h3>" + _table(
            ["true class", "predicted as", "images", "share of true class"],
            [[names[a], names[b], int(cm[a, b]), _pct(norm[a, b], 1)] for a, b in pairs],
            num_cols={2, 3},
        )
    return out


# robustness ---------------------------------------------------------------------------------
# (key, row label with unit, format) of results.json's single numbers; see robustness/
ROBUSTNESS_SCALARS = [
    ("clean_top1", "clean top-1 (%)", "{:.2f}"),
    ("clean_top5", "clean top-5 (%)", "{:.2f}"),
    ("unnormalized_ce", "mean corruption error, unnormalised (%)", "{:.2f}"),
    ("mce", "mCE, vs reference (%)", "{:.2f}"),
    ("relative_mce", "relative mCE, vs reference (%)", "{:.2f}"),
    ("mean_flip_prob", "mean flip probability (fraction of frames)", "{:.4f}"),
    ("mfr", "mFR, vs reference (%)", "{:.2f}"),
    ("top5_distance", "mean top-5 distance (ranks)", "{:.4f}"),
    ("filtered_hard_acc", "filtered-hard accuracy (%)", "{:.2f}"),
    ("ece", "expected calibration error, ECE (%)", "{:.2f}"),
]
_PGD_KEY = re.compile(r"pgd(\d+)_(.+)")


def _robustness_results(run: _Run) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for i in run.iterations:
        p = run.iter_dir(i) / "robustness" / "results.json"
        if p.is_file():
            r = read_json(p)
            if not isinstance(r, dict):
                raise UserError(f"'{p}' is not a JSON object; delete it and re-run robustness")
            out.append((i, r))
    return out


def _dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _fgsm_points(r: dict[str, Any]) -> list[tuple[float, float]]:
    """[(eps in 1/255 pixel units, accuracy %)] of FGSM, sorted by eps."""
    pts = [(_num(k), _num(v)) for k, v in _dict(_dict(r.get("adversarial")).get("fgsm")).items()]
    return sorted((e, v) for e, v in pts if e is not None and v is not None)


def _pgd_points(r: dict[str, Any]) -> list[tuple[int, float, float]]:
    """[(steps, eps, accuracy %)] of every `pgd<steps>_<eps>` entry."""
    out = []
    for k, v in _dict(r.get("adversarial")).items():
        m = _PGD_KEY.fullmatch(str(k))
        if m and _num(m.group(2)) is not None and _num(v) is not None:
            out.append((int(m.group(1)), _num(m.group(2)), _num(v)))
    return sorted(out)


def _fmt(v: Any, fmt: str) -> str:
    f = _num(v)
    return "–" if f is None else fmt.format(f)


def _robustness_table(results: list[tuple[int, dict[str, Any]]], label: dict[int, str]) -> str:
    rows = []
    for key, name, fmt in ROBUSTNESS_SCALARS:
        if any(_num(r.get(key)) is not None for _, r in results):
            rows.append([name] + [_fmt(r.get(key), fmt) for _, r in results])
    eps = sorted({e for _, r in results for e, _ in _fgsm_points(r)})
    for e in eps:
        rows.append(
            [f"FGSM accuracy, ε = {e:g}/255 (%)"]
            + [_fmt(dict(_fgsm_points(r)).get(e), "{:.2f}") for _, r in results]
        )
    pgd = sorted({(s, e) for _, r in results for s, e, _ in _pgd_points(r)})
    for s, e in pgd:
        rows.append(
            [f"PGD-{s} accuracy, ε = {e:g}/255 (%)"]
            + [
                _fmt({(a, b): v for a, b, v in _pgd_points(r)}.get((s, e)), "{:.2f}")
                for _, r in results
            ]
        )
    if not rows:
        return ""
    return _table(
        ["metric"] + [label[i] for i, _ in results], rows, set(range(1, len(results) + 1))
    )


def _corruption_figure(corr: list[tuple[int, dict[str, Any]]], label: dict[int, str]) -> Any:
    """One heatmap per model (corruption x severity, error %), on one shared colour scale."""
    names = list(dict.fromkeys(n for _, c in corr for n in c))  # results.json order
    sevs = sorted({s for _, c in corr for n in c for s in _dict(c[n])}, key=lambda s: _num(s) or 0)
    mats = []
    for _, c in corr:
        m = np.full((len(names), len(sevs)), np.nan)
        for a, n in enumerate(names):
            for b, s in enumerate(sevs):
                v = _num(_dict(c.get(n)).get(s))
                if v is not None:
                    m[a, b] = v
        mats.append(m)
    finite = np.concatenate([m[np.isfinite(m)] for m in mats])
    vmax = max(1.0, float(finite.max())) if len(finite) else 100.0
    cols = min(3, len(corr))
    rows = (len(corr) + cols - 1) // cols
    fig = _figure(4.0 * cols + 1.6, rows * (0.3 * len(names) + 1.3))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    im = None
    for k, ((i, _), m) in enumerate(zip(corr, mats, strict=True)):
        ax = axes[k]
        im = ax.imshow(m, cmap="magma_r", vmin=0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(sevs)))
        ax.set_xticklabels(sevs)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(
            [n.replace("_", " ") for n in names] if k % cols == 0 else [], fontsize=8
        )
        for a in range(len(names)):
            for b in range(len(sevs)):
                if np.isfinite(m[a, b]):
                    ax.text(
                        b,
                        a,
                        f"{m[a, b]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if m[a, b] > 0.55 * vmax else "black",
                    )
        ax.set_xlabel("severity (1 mildest … 5 strongest)")
        ax.set_title(label[i], fontsize=10)
    for ax in axes[len(corr) :]:
        ax.axis("off")
    cb = fig.colorbar(im, ax=list(axes), shrink=0.9)
    cb.set_label("top-1 error (%)")
    fig.suptitle("Error by corruption and severity", fontsize=11)
    return fig


def _adversarial_figure(results: list[tuple[int, dict[str, Any]]], label: dict[int, str]) -> Any:
    fig = _figure(7.5, 3.8)
    ax = fig.add_subplot()
    for n, (i, r) in enumerate(results):
        pts = _fgsm_points(r)
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=f"C{n}", label=f"{label[i]}: FGSM")
        for s, e, v in _pgd_points(r):
            ax.plot([e], [v], "s", ms=8, mfc="none", color=f"C{n}", label=f"{label[i]}: PGD-{s}")
    ax.set_xlabel("attack size ε (pixel units of 1/255)")
    ax.set_ylabel("accuracy under attack (%)")
    ax.set_title("Adversarial robustness: accuracy vs ε")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _flip_figure(flips: list[tuple[int, dict[str, Any]]], label: dict[int, str]) -> Any:
    perts = list(dict.fromkeys(p for _, f in flips for p in f))
    fig = _figure(max(6.0, 0.9 * len(perts) + 2.5), 3.8)
    ax = fig.add_subplot()
    w = 0.8 / len(flips)
    x = np.arange(len(perts))
    for n, (i, f) in enumerate(flips):
        vals = [_num(f.get(p)) for p in perts]
        ax.bar(
            x + (n - (len(flips) - 1) / 2) * w,
            [np.nan if v is None else v for v in vals],
            w,
            label=label[i],
            color=f"C{n}",
        )
    ax.set_xticks(x)
    ax.set_xticklabels([p.replace("_", " ") for p in perts], rotation=30, ha="right")
    ax.set_xlabel("perturbation sequence")
    ax.set_ylabel("flip probability (fraction of frames)")
    ax.set_title("Top-1 prediction flips along perturbation sequences")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig


def section_robustness(run: _Run) -> str:
    results = _robustness_results(run)
    if not results:
        return _note(
            "No robustness results in this run (iter<i>/robustness/results.json); the section "
            "fills in once the robustness stage has run."
        )
    label = {i: f"iter{i} {run.cfg.models[i]}" for i, _ in results}
    out = [_robustness_table(results, label)]
    out.append(
        _note(
            "mCE and mFR: corruption error and flip rate normalised by the reference model "
            "(= 100 for the reference), as in the paper's ImageNet-C/-P protocols; "
            "filtered-hard: accuracy on the test images the reference gets wrong."
        )
    )
    corr = [(i, r["corruption"]) for i, r in results if _dict(r.get("corruption"))]
    if corr:
        out.append(_img(_corruption_figure(corr, label), "error by corruption and severity"))
    if any(_fgsm_points(r) or _pgd_points(r) for _, r in results):
        out.append(_img(_adversarial_figure(results, label), "accuracy under attack vs epsilon"))
    flips = [(i, r["flip"]) for i, r in results if _dict(r.get("flip"))]
    if flips:
        out.append(_img(_flip_figure(flips, label), "flip probability by perturbation"))
    return "\n".join(out)


SECTION_BUILDERS: dict[str, Callable[[_Run], str]] = {
    "config": section_config,
    "iterations": section_iterations,
    "training": section_training,
    "confidence": section_confidence,
    "selection": section_selection,
    "samples": section_samples,
    "confusion": section_confusion,
    "robustness": section_robustness,
}


# --------------------------------------------------------------------------------------------
# the page
CSS = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       margin: 0; background: #fafafa; }
main { max-width: 1220px; margin: 0 auto; padding: 0 20px 40px; background: #fff; }
header { padding: 18px 0 4px; }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.3em; margin: 32px 0 10px; padding-top: 8px; border-top: 1px solid #ddd; }
h3 { font-size: 1.05em; margin: 18px 0 6px; }
nav { position: sticky; top: 0; background: #fff; padding: 8px 0; border-bottom: 1px solid #ddd;
      z-index: 1; font-size: 0.92em; }
nav a { margin-right: 14px; color: #1f5fa8; text-decoration: none; white-space: nowrap; }
nav a:hover { text-decoration: underline; }
section { scroll-margin-top: 48px; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 0.93em; }
th, td { border: 1px solid #ddd; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 8px 0; }
figure img { max-width: 100%; height: auto; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 0.85em; }
.meta, .note { color: #555; font-size: 0.92em; }
.row { display: flex; flex-wrap: wrap; gap: 0 24px; align-items: flex-start; }
.row table { margin-top: 0; }
.warn { color: #8a4b00; background: #fff4e0; padding: 6px 10px; border-left: 4px solid #e69500; }
"""


def _page(run: _Run, sections: list[tuple[str, str, str]], extra: list[str]) -> str:
    nav = "".join(f'<a href="#{sid}">{_esc(title)}</a>' for sid, title, _ in sections)
    body = "\n".join(
        f'<section id="{sid}"><h2>{_esc(title)}</h2>\n{content}\n</section>'
        for sid, title, content in sections
    )
    meta = (
        f"run directory <code>{_esc(run.root.resolve())}</code> · written "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} by noisystudent {__version__}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Noisy Student run report: {_esc(run.root.name)}</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<header><h1>Noisy Student run report: {_esc(run.root.name)}</h1>"
        f'<p class="meta">{meta}</p>{"".join(extra)}</header>\n'
        f"<nav>{nav}</nav>\n{body}\n</main>\n</body>\n</html>\n"
    )


def build_report(
    run_dir: str | Path,
    cfg: Config | None = None,
    data: Any = None,
    tensorboard: bool = True,
) -> Report:
    """Write RUN_DIR/report.html from what the run directory holds; returns its path.

    cfg: the run's config (default: RUN_DIR/config.yaml); data: the run's `stages.Data` if the
    caller has it loaded (default: loaded here, for the sample images and class names).
    tensorboard: also export metrics.jsonl as TensorBoard scalars to RUN_DIR/tensorboard when
    the `tensorboard` package is installed. A section whose files are unreadable shows the
    problem in the page (and in `Report.problems`) instead of failing, so a partial or damaged
    run still gets a report; a RUN_DIR that is not a run directory is a UserError.
    """
    run = _open_run(run_dir, cfg, data)
    extra = []
    if run.data_error:
        extra.append(_note(f"Images unavailable: {run.data_error}", "warn"))
    if tensorboard:
        from .tb import export_scalars

        n = export_scalars(run.root / "metrics.jsonl", run.root / "tensorboard")
        if n:
            extra.append(
                _note(
                    f"TensorBoard: {n} scalars, same names as metrics.jsonl: "
                    f"tensorboard --logdir {run.root / 'tensorboard'}"
                )
            )
    sections = []
    for sid, title in SECTIONS:
        try:
            content = SECTION_BUILDERS[sid](run)
        except UserError as e:
            run.problems.append(f"{title}: {e}")
            content = _note(f"This section could not be drawn: {e}", "warn")
        sections.append((sid, title, content))
    path = report_path(run.root)
    write_text(path, _page(run, sections, extra))
    return Report(path, run.problems)
