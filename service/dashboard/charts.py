"""Inline SVG charts for the admin dashboard, drawn on the server.

Each function returns escaped SVG markup to drop into a template. Colours are not chosen here:
shapes carry a CSS class ``series-<name>`` that ``static/kiln.css`` colours, so a chart and the
HTML legend next to it always agree. Every label and tooltip goes through ``escape``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

FONT = 11  # px, in viewBox units; the CSS scales the whole chart to its container


def tag(name: str, body: str | Markup = "", /, **attrs: object) -> Markup:
    """One SVG element. ``class_`` gives ``class``; other underscores become dashes."""
    rendered = "".join(
        f' {k.rstrip("_").replace("_", "-")}="{escape(_num(v) if isinstance(v, float) else v)}"'
        for k, v in attrs.items() if v is not None)
    return Markup(f"<{name}{rendered}>{escape(body)}</{name}>")


def series(name: str) -> str:
    """The CSS class that colours a series (``aoti``, ``build``, ``cached``...)."""
    return "series-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def svg(width: int, height: int, body: Sequence[Markup], label: str, class_: str = "") -> Markup:
    # Drawn at its natural size and shrunk (never enlarged) to fit: text stays legible.
    return tag("svg", Markup("").join(body), class_=f"chart {class_}".strip(),
               width=width, height=height, viewBox=f"0 0 {width} {height}", role="img",
               aria_label=label, xmlns="http://www.w3.org/2000/svg")


def _num(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def short(value: float) -> str:
    """A compact tick label: 0.25, 3, 12, 1.5k, 2M."""
    for limit, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def nice_scale(value: float, ticks: int = 4) -> tuple[float, float]:
    """(top, step) for an axis from 0 that shows ``value``: a step of 1, 2 or 5 times a power
    of ten, about ``ticks`` steps, and a top that is a whole number of steps."""
    if value <= 0:
        return 1.0, 1.0
    raw = value / ticks
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    return max(step * math.ceil(value / step - 1e-9), step), step


# ---- vertical bars (stacked) ------------------------------------------------------------

@dataclass(frozen=True)
class Bar:
    label: str                                # x-axis label; "" for none
    segments: Sequence[tuple[str, float]]     # (series, value), stacked bottom-up
    title: str = ""                           # tooltip
    href: str | None = None                   # the bar links here
    note: str = ""                            # small text above the bar


def bar_chart(bars: Sequence[Bar], *, unit: str = "", width: int = 640, height: int = 200,
              max_labels: int = 12, label: str = "bar chart", x_title: str = "",
              y_title: str = "", scale: tuple[float, float] | None = None) -> Markup:
    """Stacked bars. A bucket with data is a bar however few the data: a lone bar with its
    ``note`` (a count) reads as "one bucket of n", where a lone dot on a line reads as nothing.
    """
    left, right, top, bottom = 40 + (16 if y_title else 0), 8, 16, 20 + (16 if x_title else 0)
    plot_w, plot_h = width - left - right, height - top - bottom
    ymax, ystep = scale or nice_scale(max((sum(v for _, v in b.segments) for b in bars),
                                          default=0))
    body = _y_axis(ymax, ystep, unit, left, top, plot_w, plot_h)
    body += _titles(x_title, y_title, width, height, left, top, plot_w, plot_h)
    if not bars:
        return svg(width, height, [*body, _empty(width, height)], label)
    # A few bars stay bar-sized (one build is not a wall of colour), drawn from the left.
    step = min(plot_w / len(bars), 48.0)
    gap = min(step * 0.2, 6)
    every = math.ceil(len(bars) / max_labels)
    for i, bar in enumerate(bars):
        x, y = left + i * step + gap / 2, float(top + plot_h)
        rects = []
        for name, value in bar.segments:
            h = plot_h * value / ymax
            y -= h
            rects.append(tag("rect", tag("title", f"{name}: {short(value)}{unit}"),
                             x=x, y=y, width=step - gap, height=h, class_=series(name)))
        group = Markup("").join(rects)
        if bar.title:
            group = tag("title", bar.title) + group
        body.append(tag("a", group, href=bar.href) if bar.href else tag("g", group))
        if bar.note:
            body.append(tag("text", bar.note, x=x + (step - gap) / 2, y=y - 3,
                            text_anchor="middle", class_="note"))
        if bar.label and i % every == 0:
            body.append(tag("text", bar.label, x=x + (step - gap) / 2,
                            y=top + plot_h + 15, text_anchor="middle"))
    return svg(width, height, body, label)


def _titles(x_title: str, y_title: str, width: int, height: int, left: int, top: int,
            plot_w: float, plot_h: float) -> list[Markup]:
    """Axis titles: what the x axis counts in, and what the y axis measures."""
    out = []
    if x_title:
        out.append(tag("text", x_title, x=left + plot_w / 2, y=height - 3, text_anchor="middle",
                       class_="axis-title"))
    if y_title:
        cy = top + plot_h / 2
        out.append(tag("text", y_title, x=11, y=cy, text_anchor="middle", class_="axis-title",
                       transform=f"rotate(-90 11 {_num(cy)})"))
    return out


def _y_axis(ymax: float, step: float, unit: str, left: int, top: int, plot_w: float,
            plot_h: float) -> list[Markup]:
    out = []
    for k in range(round(ymax / step) + 1):
        value = step * k
        y = top + plot_h - plot_h * value / ymax
        out.append(tag("line", x1=left, x2=left + plot_w, y1=y, y2=y, class_="gridline"))
        out.append(tag("text", f"{short(value)}{unit}", x=left - 4, y=y + FONT / 3,
                       text_anchor="end"))
    return out


def _empty(width: int, height: int) -> Markup:
    return tag("text", "no data yet", x=width / 2, y=height / 2, text_anchor="middle",
               class_="note")


# ---- line -------------------------------------------------------------------------------

def line_chart(points: Sequence[tuple[str, float | None]], *,
               scale: tuple[float, float] | None = None, unit: str = "", name: str = "line",
               width: int = 640, height: int = 160, max_labels: int = 12,
               label: str = "line chart", x_title: str = "", y_title: str = "") -> Markup:
    """A line through the points; a None value leaves a gap (nothing to measure there).

    ``scale`` fixes the y axis as (top, step), e.g. (100, 25) for percentages.
    """
    left, right, top, bottom = 40 + (16 if y_title else 0), 8, 10, 20 + (16 if x_title else 0)
    plot_w, plot_h = width - left - right, height - top - bottom
    ymax, ystep = scale or nice_scale(max((v for _, v in points if v is not None), default=0))
    body = _y_axis(ymax, ystep, unit, left, top, plot_w, plot_h)
    body += _titles(x_title, y_title, width, height, left, top, plot_w, plot_h)
    if not any(v is not None for _, v in points):
        return svg(width, height, [*body, _empty(width, height)], label)
    step = plot_w / len(points)
    every = math.ceil(len(points) / max_labels)
    runs: list[list[tuple[float, float]]] = [[]]
    for i, (text, value) in enumerate(points):
        x = left + step * (i + 0.5)
        if text and i % every == 0:
            body.append(tag("text", text, x=x, y=top + plot_h + 15, text_anchor="middle"))
        if value is None:
            runs.append([])
            continue
        y = top + plot_h - plot_h * value / ymax
        runs[-1].append((x, y))
        body.append(tag("circle", tag("title", f"{text}: {short(value)}{unit}"),
                        cx=x, cy=y, r=3, class_=series(name)))
    for run in runs:
        if len(run) > 1:
            body.append(tag("polyline", points=" ".join(f"{_num(x)},{_num(y)}" for x, y in run),
                            class_=f"line {series(name)}"))
    return svg(width, height, body, label)


# ---- horizontal: a timeline of phases, paired bars, a shape range -------------------------

def timeline(segments: Sequence[tuple[str, float]], *, unit: str = "s", width: int = 640,
             height: int = 46, label: str = "timeline") -> Markup:
    """Phases laid end to end on one bar, each as long as it took."""
    left, right = 4, 4
    plot_w = width - left - right
    total = sum(v for _, v in segments)
    if total <= 0:
        return svg(width, height, [_empty(width, height)], label)
    body, x = [], float(left)
    for name, value in segments:
        w = plot_w * value / total
        text = f"{name} {short(value)}{unit}"
        body.append(tag("rect", tag("title", text), x=x, y=4, width=w, height=22,
                        class_=series(name)))
        if w > len(text) * FONT * 0.6:  # the label fits inside
            body.append(tag("text", text, x=x + w / 2, y=19, text_anchor="middle",
                            class_="inside"))
        x += w
    for k in range(5):
        tx = left + plot_w * k / 4
        anchor = "start" if k == 0 else "end" if k == 4 else "middle"
        body.append(tag("text", f"{short(total * k / 4)}{unit}", x=tx, y=height - 4,
                        text_anchor=anchor))
    return svg(width, height, body, label)


def paired_bars(rows: Sequence[tuple[str, float, float]], names: tuple[str, str], *,
                unit: str = "", width: int = 640, label: str = "comparison") -> Markup:
    """For each row, two horizontal bars on one scale (``names[0]`` above ``names[1]``)."""
    left, right, row_h = 90, 70, 40
    plot_w = width - left - right
    height = row_h * len(rows) + 6
    xmax = max((max(a, b) for _, a, b in rows), default=0) or 1.0
    body = []
    for i, (text, *values) in enumerate(rows):
        y0 = 4 + i * row_h
        body.append(tag("text", text, x=left - 6, y=y0 + 19, text_anchor="end"))
        for j, (name, value) in enumerate(zip(names, values)):
            y = y0 + j * 16
            w = max(plot_w * value / xmax, 1)
            body.append(tag("rect", tag("title", f"{text} {name}: {value:.4g}{unit}"),
                            x=left, y=y, width=w, height=14, class_=series(name)))
            body.append(tag("text", f"{value:.3g}{unit}", x=left + w + 4, y=y + 11))
    return svg(width, height, body, label)


@dataclass(frozen=True)
class Axis:
    """A number line for shape ranges: log scale when the values span a wide range."""

    lo: float
    hi: float
    log: bool

    @classmethod
    def fit(cls, lo: float, hi: float) -> Axis:
        lo, hi = max(lo, 1), max(hi, lo + 1, 2)
        if hi / lo >= 16:
            return cls(1, hi, True)
        return cls(0, hi, False)

    def at(self, value: float) -> float:
        """Where ``value`` falls, from 0 (the axis start) to 1 (its end)."""
        if self.log:
            return math.log(max(value, 1)) / math.log(self.hi)
        return (value - self.lo) / (self.hi - self.lo)


def range_bar(lo: int, opt: int, hi: int, axis: Axis, *, name: str = "range",
              width: int = 220, height: int = 34, label: str = "range") -> Markup:
    """The range min..max on the axis as a bar, the opt value as a tick with its number."""
    left, right = 16, 16
    plot_w = width - left - right

    def x(v: float) -> float:
        return left + plot_w * axis.at(v)

    def fit(center: float, text: str) -> float:  # keep a centred label inside the chart
        half = len(text) * FONT * 0.3
        return min(max(center, half), width - half)

    x0, x1, xo = x(lo), x(hi), x(opt)
    lo_text, hi_text, opt_text = str(lo), str(hi), f"opt {opt}"
    gap = (len(lo_text) + len(hi_text)) * FONT * 0.3 + 6
    if x1 - x0 < gap:  # a narrow range: push the two end labels apart
        mid = (x0 + x1) / 2
        x0_label, x1_label = mid - gap / 2, mid + gap / 2
    else:
        x0_label, x1_label = x0, x1
    body = [
        tag("line", x1=left, x2=left + plot_w, y1=16, y2=16, class_="track"),
        tag("rect", tag("title", f"{label}: {lo} to {hi}, opt {opt}"),
            x=x0, y=11, width=max(x1 - x0, 2), height=10, rx=2, class_=series(name)),
        tag("line", x1=xo, x2=xo, y1=8, y2=24, class_="opt"),
        tag("text", lo_text, x=fit(x0_label, lo_text), y=height - 1, text_anchor="middle",
            class_="min"),
        tag("text", hi_text, x=fit(x1_label, hi_text), y=height - 1, text_anchor="middle",
            class_="max"),
        tag("text", opt_text, x=fit(xo, opt_text), y=7, text_anchor="middle", class_="opt"),
    ]
    return svg(width, height, body, f"{label}: {lo} to {hi}, opt {opt}"
               + (" (log axis)" if axis.log else ""), class_="range")
