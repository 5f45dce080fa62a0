"""The robustness section: what the robustness stage wrote to iter<i>/robustness/results.json
(clean accuracy, corruption error per corruption and severity, mCE, flip probabilities, mFR,
FGSM/PGD accuracy, filtered-hard accuracy, ECE), for every model that has one."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..errors import UserError
from ..rundir import read_json
from .parts import figure, img, note, num, table
from .runfiles import RunFiles

# (key, row label with unit, format) of results.json's single numbers; see robustness/
ROBUSTNESS_SCALARS = [
    ("n_images", "test images evaluated", "{:,.0f}"),
    ("clean_top1", "clean top-1 (%)", "{:.2f}"),
    ("clean_top5", "clean top-5 (%)", "{:.2f}"),
    ("unnormalized_ce", "mean corruption error, unnormalised (%)", "{:.2f}"),
    ("held_out_unnormalized_ce", "… on the held-out corruptions (%)", "{:.2f}"),
    ("mce", "mCE, vs reference (%)", "{:.2f}"),
    ("relative_mce", "relative mCE, vs reference (%)", "{:.2f}"),
    ("mean_flip_prob", "mean flip probability (fraction of frames)", "{:.4f}"),
    ("mfr", "mFR, vs reference (%)", "{:.2f}"),
    ("top5_distance", "mean top-5 distance (ranks)", "{:.4f}"),
    ("filtered_hard_acc", "filtered-hard accuracy (%)", "{:.2f}"),
    ("ece", "expected calibration error, ECE (%)", "{:.2f}"),
]
_PGD_KEY = re.compile(r"pgd(\d+)_(.+)")


def _robustness_results(run: RunFiles) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for i in run.iterations:
        p = run.it(i).robustness_results
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
    pts = [(num(k), num(v)) for k, v in _dict(_dict(r.get("adversarial")).get("fgsm")).items()]
    return sorted((e, v) for e, v in pts if e is not None and v is not None)


def _pgd_points(r: dict[str, Any]) -> list[tuple[int, float, float]]:
    """[(steps, eps, accuracy %)] of every `pgd<steps>_<eps>` entry."""
    out = []
    for k, v in _dict(r.get("adversarial")).items():
        m = _PGD_KEY.fullmatch(str(k))
        if m and num(m.group(2)) is not None and num(v) is not None:
            out.append((int(m.group(1)), num(m.group(2)), num(v)))
    return sorted(out)


def _fmt(v: Any, fmt: str) -> str:
    f = num(v)
    return "–" if f is None else fmt.format(f)


def _robustness_table(results: list[tuple[int, dict[str, Any]]], label: dict[int, str]) -> str:
    rows = []
    for key, name, fmt in ROBUSTNESS_SCALARS:
        if any(num(r.get(key)) is not None for _, r in results):
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
    return table(["metric"] + [label[i] for i, _ in results], rows, set(range(1, len(results) + 1)))


def _corruption_figure(corr: list[tuple[int, dict[str, Any]]], label: dict[int, str]) -> Any:
    """One heatmap per model (corruption x severity, error %), on one shared colour scale."""
    names = list(dict.fromkeys(n for _, c in corr for n in c))  # results.json order
    sevs = sorted({s for _, c in corr for n in c for s in _dict(c[n])}, key=lambda s: num(s) or 0)
    mats = []
    for _, c in corr:
        m = np.full((len(names), len(sevs)), np.nan)
        for a, n in enumerate(names):
            for b, s in enumerate(sevs):
                v = num(_dict(c.get(n)).get(s))
                if v is not None:
                    m[a, b] = v
        mats.append(m)
    finite = np.concatenate([m[np.isfinite(m)] for m in mats])
    vmax = max(1.0, float(finite.max())) if len(finite) else 100.0
    cols = min(3, len(corr))
    rows = (len(corr) + cols - 1) // cols
    fig = figure(4.0 * cols + 1.6, rows * (0.3 * len(names) + 1.3))
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
        if k % cols == 0:
            ax.set_ylabel("corruption")
        ax.set_title(label[i], fontsize=10)
    for ax in axes[len(corr) :]:
        ax.axis("off")
    cb = fig.colorbar(im, ax=list(axes), shrink=0.9)
    cb.set_label("top-1 error (%)")
    fig.suptitle("Error by corruption and severity", fontsize=11)
    return fig


def _adversarial_figure(results: list[tuple[int, dict[str, Any]]], label: dict[int, str]) -> Any:
    fig = figure(7.5, 3.8)
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
    fig = figure(max(6.0, 0.9 * len(perts) + 2.5), 3.8)
    ax = fig.add_subplot()
    w = 0.8 / len(flips)
    x = np.arange(len(perts))
    for n, (i, f) in enumerate(flips):
        vals = [num(f.get(p)) for p in perts]
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


def section_robustness(run: RunFiles) -> str:
    results = _robustness_results(run)
    if not results:
        return note(
            "No robustness results in this run (iter<i>/robustness/results.json): run "
            f"`noisystudent robustness {run.root}` (or the pipeline with robustness.enabled=true), "
            f"then `noisystudent report {run.root}`."
        )
    label = {i: f"iter{i} {run.cfg.models[i]}" for i, _ in results}
    out = [_robustness_table(results, label)]
    for i, r in results:  # what the robustness stage itself flagged (e.g. an undefined mFR)
        for w in r.get("warnings") or []:
            out.append(note(f"{label[i]}: {w}", "warn"))
    out.append(
        note(
            "mCE and mFR: corruption error and flip rate normalised by the reference model "
            "(= 100 for the reference), as in the paper's ImageNet-C/-P protocols; "
            "filtered-hard: accuracy on the test images the reference gets wrong."
        )
    )
    corr = [(i, r["corruption"]) for i, r in results if _dict(r.get("corruption"))]
    if corr:
        out.append(img(_corruption_figure(corr, label), "error by corruption and severity"))
    if any(_fgsm_points(r) or _pgd_points(r) for _, r in results):
        out.append(img(_adversarial_figure(results, label), "accuracy under attack vs epsilon"))
    flips = [(i, r["flip"]) for i, r in results if _dict(r.get("flip"))]
    if flips:
        out.append(img(_flip_figure(flips, label), "flip probability by perturbation"))
    return "\n".join(out)
