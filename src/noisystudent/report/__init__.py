"""The run report: the pictures a user wants to look at, in one self-contained HTML page.

    noisystudent report RUN_DIR        (re)writes RUN_DIR/report.html; the pipeline does it too

Sections, each read from the run directory only (it never changes what a stage wrote):
the resolved config in brief; one row per iteration (model, parameters, test top-1/top-5,
pseudo-label accuracy, the fractions that passed the confidence filter and that were kept
after balancing, wall time); training curves (loss, accuracy, learning rate)
per stage; teacher-confidence histograms; per-class counts before and after selection; sample
pseudo-labeled images (most and least confident per class); the final model's confusion matrix;
robustness (iter<i>/robustness/results.json) when present.

Every picture is a PNG embedded as a `data:` URI, so the page opens offline and stays whole when
copied or mailed as one file. Plots are drawn on matplotlib's Agg canvas directly (no pyplot, no
global backend switch, no display needed). A section whose inputs are missing or unreadable says
so in the page instead of failing the whole report.

    runfiles.py    the run directory as the report reads it (config, summary, metrics, images)
    parts.py       figures as embedded PNGs, tables, notes
    sections.py    config, iterations, training, confidence, selection, samples, confusion
    robustness.py  the robustness stage's results.json
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import Config
from ..errors import UserError
from ..rundir import RunLayout, write_text
from .parts import esc, note
from .robustness import section_robustness
from .runfiles import RunFiles, open_run_files
from .sections import (
    section_confidence,
    section_config,
    section_confusion,
    section_iterations,
    section_samples,
    section_selection,
    section_training,
)

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
    return RunLayout(run_dir).report


@dataclass
class Report:
    path: Path  # RUN_DIR/report.html
    problems: list[str]  # sections that could not be drawn, one line each


SECTION_BUILDERS: dict[str, Callable[[RunFiles], str]] = {
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
nav { display: flex; flex-wrap: wrap; gap: 2px 14px; }
nav a { color: #1f5fa8; text-decoration: none; white-space: nowrap; }
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


def _page(run: RunFiles, sections: list[tuple[str, str, str]], extra: list[str]) -> str:
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title, _ in sections)
    body = "\n".join(
        f'<section id="{sid}"><h2>{esc(title)}</h2>\n{content}\n</section>'
        for sid, title, content in sections
    )
    meta = (
        f"run directory <code>{esc(run.root.resolve())}</code> · written "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} by noisystudent {__version__}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Noisy Student run report: {esc(run.root.name)}</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<header><h1>Noisy Student run report: {esc(run.root.name)}</h1>"
        f'<p class="meta">{meta}</p>{"".join(extra)}</header>\n'
        f"<nav>{nav}</nav>\n{body}\n</main>\n</body>\n</html>\n"
    )


def build_report(
    run_dir: str | Path,
    cfg: Config | None = None,
    data: Any = None,
    tensorboard: bool = True,
) -> Report:
    """Write RUN_DIR/report.html from what the run directory holds; returns its path and the
    problems of the sections that could not be drawn.

    cfg: the run's config (default: RUN_DIR/config.yaml); data: the run's `inputs.Data` if the
    caller has it loaded (default: loaded here, for the sample images and class names).
    tensorboard: also export metrics.jsonl as TensorBoard scalars to RUN_DIR/tensorboard when
    the `tensorboard` package is installed. A section whose files are unreadable shows the
    problem in the page (and in `Report.problems`) instead of failing, so a partial or damaged
    run still gets a report; a RUN_DIR that is not a run directory is a UserError.
    """
    run = open_run_files(run_dir, cfg, data)
    extra = []
    if run.data_error:
        extra.append(note(f"Images unavailable: {run.data_error}", "warn"))
    if tensorboard:
        from ..tb import export_scalars

        try:
            n = export_scalars(run.layout.metrics, run.layout.tensorboard)
        except Exception as e:  # optional extra: never what stops the report
            run.problems.append(f"TensorBoard export: {type(e).__name__}: {e}")
            n = 0
        if n is None:
            extra.append(note('TensorBoard scalars: pip install "noisystudent[tensorboard]".'))
        elif n:
            extra.append(
                note(
                    f"TensorBoard: {n} scalars, same names as metrics.jsonl: "
                    f"tensorboard --logdir {run.layout.tensorboard}"
                )
            )
    sections = []
    for sid, title in SECTIONS:
        try:
            content = SECTION_BUILDERS[sid](run)
        except UserError as e:
            run.problems.append(f"{title}: {e}")
            content = note(f"This section could not be drawn: {e}", "warn")
        sections.append((sid, title, content))
    path = run.layout.report
    write_text(path, _page(run, sections, extra))
    return Report(path, run.problems)
