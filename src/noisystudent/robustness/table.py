"""The robustness results as a paper-style Markdown table, and as one line for the run log."""

from __future__ import annotations

from typing import Any


def _f(v: Any, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def format_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """Paper-style Markdown table, one row per (label, results)."""
    eps = []
    for _, r in rows:
        if r.get("adversarial"):
            eps = list(r["adversarial"]["fgsm"])
            break
    pgd_key = next(
        (
            k
            for _, r in rows
            if r.get("adversarial")
            for k in r["adversarial"]
            if k.startswith("pgd")
        ),
        None,
    )
    head = ["model", "clean top-1", "corrupted top-1", "mCE (vs ref)", "uCE", "rel. mCE"]
    head += ["mean FP", "mFR (vs ref)", "mT5D (u)"]
    head += [f"FGSM {e}" for e in eps]
    if pgd_key:
        steps, e = pgd_key[3:].split("_")
        head.append(f"PGD-{steps} @{e}")
    head += ["filtered-hard", "ECE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows:
        cells = [
            label,
            _f(r.get("clean_top1")),
            _f(r.get("mean_corrupted_top1")),
            _f(r.get("mce"), 1),
            _f(r.get("unnormalized_ce")),
            _f(r.get("relative_mce"), 1),
            _f(r.get("mean_flip_prob"), 4),
            _f(r.get("mfr"), 1),
            _f(r.get("top5_distance"), 3),
        ]
        adv = r.get("adversarial") or {}
        cells += [_f((adv.get("fgsm") or {}).get(e)) for e in eps]
        if pgd_key:
            cells.append(_f(adv.get(pgd_key)))
        fh = r.get("filtered_hard_acc")
        cells.append(_f(fh) + (f" (n={r['filtered_hard_n']})" if fh is not None else ""))
        cells.append(_f(r.get("ece")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def one_line(r: dict[str, Any]) -> str:
    """A short summary of one results dict for the pipeline log."""
    adv = r.get("adversarial") or {}
    pgd = next((v for k, v in adv.items() if k.startswith("pgd")), None)
    return (
        f"corrupted top-1 {_f(r.get('mean_corrupted_top1'))}%  mCE {_f(r.get('mce'), 1)}  "
        f"mean FP {_f(r.get('mean_flip_prob'), 4)}  mFR {_f(r.get('mfr'), 1)}  "
        f"PGD {_f(pgd)}%  filtered-hard {_f(r.get('filtered_hard_acc'))}%"
    )
