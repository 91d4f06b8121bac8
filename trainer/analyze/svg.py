"""Small dependency-free SVG figures (histograms, curves, scatter maps) for the files the CLIs write."""
from __future__ import annotations

import html
import math
from typing import List, Optional, Sequence, Tuple

PALETTE = ["#2f6fd6", "#e8731c", "#2a9d55", "#b8457a", "#6b5bd2"]


def _num(x: float) -> str:
    return f"{x:.1f}"


def _tick(v: float) -> str:
    if v == 0:
        return "0"
    if float(v).is_integer() and abs(v) < 1e7:
        return str(int(v))
    a = abs(v)
    if a >= 1e4 or a < 1e-2:
        return f"{v:.0e}"
    return f"{v:.3g}"


def _nice_ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


class Figure:
    """One plot area with axes; add bars, lines or points in data coordinates, then ``svg()``."""

    def __init__(self, title: str, xlabel: str, ylabel: str, xlim: Tuple[float, float], ylim: Tuple[float, float],
                 width: int = 560, height: int = 340, xlog: bool = False) -> None:
        self.title, self.xlabel, self.ylabel = title, xlabel, ylabel
        self.xlim, self.ylim, self.w, self.h, self.xlog = xlim, ylim, width, height, xlog
        self.m = (56, 16, 34, 46)  # left, right, top, bottom
        self.items: List[str] = []
        self.legend: List[Tuple[str, str]] = []

    def x(self, v: float) -> float:
        lo, hi = self.xlim
        if self.xlog:
            v, lo, hi = math.log10(v), math.log10(lo), math.log10(hi)
        return self.m[0] + (v - lo) / (hi - lo or 1) * (self.w - self.m[0] - self.m[1])

    def y(self, v: float) -> float:
        lo, hi = self.ylim
        return self.h - self.m[3] - (v - lo) / (hi - lo or 1) * (self.h - self.m[2] - self.m[3])

    def bars(self, edges: Sequence[float], counts: Sequence[float], color: str = PALETTE[0], label: Optional[str] = None,
             opacity: float = 0.85) -> None:
        for a, b, c in zip(edges[:-1], edges[1:], counts):
            if c <= 0:
                continue
            x0, x1, y0 = self.x(a), self.x(b), self.y(c)
            self.items.append(f'<rect x="{_num(x0)}" y="{_num(y0)}" width="{_num(max(x1 - x0 - 0.5, 0.5))}" '
                              f'height="{_num(self.y(self.ylim[0]) - y0)}" fill="{color}" fill-opacity="{opacity}"/>')
        if label:
            self.legend.append((label, color))

    def line(self, xs: Sequence[float], ys: Sequence[float], color: str = PALETTE[0], label: Optional[str] = None,
             dots: bool = True) -> None:
        pts = [(self.x(a), self.y(b)) for a, b in zip(xs, ys) if b is not None and math.isfinite(b)]
        if pts:
            self.items.append('<polyline fill="none" stroke="%s" stroke-width="1.8" points="%s"/>' % (
                color, " ".join(f"{_num(a)},{_num(b)}" for a, b in pts)))
            if dots:
                self.items += [f'<circle cx="{_num(a)}" cy="{_num(b)}" r="2.6" fill="{color}"/>' for a, b in pts]
        if label:
            self.legend.append((label, color))

    def points(self, xs: Sequence[float], ys: Sequence[float], color: str, label: Optional[str] = None,
               r: float = 1.4, opacity: float = 0.55) -> None:
        self.items.append(f'<g fill="{color}" fill-opacity="{opacity}">' + "".join(
            f'<circle cx="{_num(self.x(a))}" cy="{_num(self.y(b))}" r="{r}"/>' for a, b in zip(xs, ys)) + "</g>")
        if label:
            self.legend.append((label, color))

    def hline(self, v: float, color: str = "#999") -> None:
        self.items.append(f'<line x1="{self.m[0]}" x2="{self.w - self.m[1]}" y1="{_num(self.y(v))}" y2="{_num(self.y(v))}" '
                          f'stroke="{color}" stroke-dasharray="4 3"/>')

    def svg(self, xticks: Optional[Sequence[Tuple[float, str]]] = None, axes: bool = True) -> str:
        w, h, (l, r, t, b) = self.w, self.h, self.m
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
               'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="11">',
               f'<rect width="{w}" height="{h}" fill="#fff"/>',
               f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13" fill="#222">{html.escape(self.title)}</text>']
        if axes:
            out.append(f'<line x1="{l}" y1="{h - b}" x2="{w - r}" y2="{h - b}" stroke="#444"/>')
            out.append(f'<line x1="{l}" y1="{t}" x2="{l}" y2="{h - b}" stroke="#444"/>')
            if xticks is None:
                lo, hi = self.xlim
                if self.xlog:
                    xticks = [(10.0 ** e, _tick(10.0 ** e)) for e in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1)]
                else:
                    xticks = [(v, _tick(v)) for v in _nice_ticks(lo, hi)]
            for v, s in xticks:
                X = self.x(v)
                out.append(f'<line x1="{_num(X)}" x2="{_num(X)}" y1="{h - b}" y2="{h - b + 4}" stroke="#444"/>'
                           f'<text x="{_num(X)}" y="{h - b + 16}" text-anchor="middle" fill="#333">{html.escape(s)}</text>')
            for v in _nice_ticks(*self.ylim):
                Y = self.y(v)
                out.append(f'<line x1="{l - 4}" x2="{l}" y1="{_num(Y)}" y2="{_num(Y)}" stroke="#444"/>'
                           f'<text x="{l - 6}" y="{_num(Y + 3.5)}" text-anchor="end" fill="#333">{_tick(v)}</text>')
            out.append(f'<text x="{(l + w - r) / 2}" y="{h - 8}" text-anchor="middle" fill="#333">{html.escape(self.xlabel)}</text>')
            out.append(f'<text transform="translate(13,{(t + h - b) / 2}) rotate(-90)" text-anchor="middle" fill="#333">'
                       f'{html.escape(self.ylabel)}</text>')
        out += self.items
        if self.legend:  # wide enough for the longest label (~6.3 px per character at 11 px), on white
            lw = min(max(150, 20 + 6.3 * max(len(s) for s, _ in self.legend)), w - r - l - 8)
            x0 = w - r - lw
            out.append(f'<rect x="{_num(x0 - 4)}" y="{t + 2}" width="{_num(lw)}" height="{15 * len(self.legend) + 6}" '
                       'fill="#fff" fill-opacity="0.85"/>')
            for i, (s, c) in enumerate(self.legend):
                y = t + 6 + 15 * i
                out.append(f'<rect x="{_num(x0)}" y="{y}" width="10" height="10" fill="{c}"/>'
                           f'<text x="{_num(x0 + 14)}" y="{y + 9}" fill="#333">{html.escape(s)}</text>')
        out.append("</svg>\n")
        return "\n".join(out)
