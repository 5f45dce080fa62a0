"""Small pieces of the page: matplotlib figures as embedded PNGs, tables, notes, numbers."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

DPI = 100  # figures are sized in inches for a ~1200 px wide page: 12 in -> 1200 px


def figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def img(fig: Any, alt: str) -> str:
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


def esc(x: Any) -> str:
    return html.escape(str(x))


def note(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{esc(text)}</p>'


def pct(v: Any, digits: int = 2) -> str:
    return "–" if v is None else f"{float(v):.{digits}f}%"


def num(v: Any) -> float | None:
    """A finite float, or None (missing, null, NaN, or not a number)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def duration(s: Any) -> str:
    s = num(s)
    if s is None:
        return "–"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {sec:02d} s"


def table(head: list[str], rows: list[list[Any]], num_cols: set[int] | None = None) -> str:
    num_cols = num_cols or set()

    def cell(tag: str, j: int, v: Any) -> str:
        cls = ' class="num"' if j in num_cols else ""
        return f"<{tag}{cls}>{esc(v)}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell("th", j, h) for j, h in enumerate(head)) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(cell("td", j, v) for j, v in enumerate(r)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)
