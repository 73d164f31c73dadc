"""Draw the Grafana dashboard beside this file (moemesh.json) as one PNG from a real run, without Grafana.

    # record 90 s of a running mesh (drive traffic meanwhile, e.g. `moemesh bench`), keep the samples, draw:
    python deploy/grafana/render.py --ready-file /tmp/mesh/ready.json --duration 90 --interval 2 \
        --scrapes /tmp/scrapes.json --out docs/dashboard.png
    # draw again from the kept samples:
    python deploy/grafana/render.py --scrapes /tmp/scrapes.json --out docs/dashboard.png

No Grafana or Prometheus runs here, so this script plays both parts: it
scrapes every service's /metrics endpoint (addresses from the mesh's ready
file) at a fixed interval, labelling each sample with `job` and `instance` as
deploy/observability/prometheus.yml's jobs would, and evaluates each panel's
own PromQL (read from the dashboard, never a second copy) with a small
evaluator of exactly the subset the dashboard uses:

    sum(v)   sum by (l, ...) (v)   rate(s[d])   histogram_quantile(q, v)   v + - * / v   (and numbers)

where a selector `s` is `name` or `name{label="x", label!="y"}` and
`$__rate_interval` becomes the rate window. Anything else (other functions,
`without`, `offset`, regex matchers, comparisons) is refused with
UnsupportedQuery rather than evaluated wrongly.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import math
import pathlib
import re
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator

from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = pathlib.Path(__file__).with_name("moemesh.json")
JOBS = {"gateway": "moemesh-gateway", "scheduler": "moemesh-scheduler", "worker": "moemesh-worker"}
LOOKBACK = 300.0  # seconds an instant selector looks back for a sample: Prometheus's default staleness

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs
Vector = dict[Labels, float]
Value = float | Vector  # a scalar (a number literal) or an instant vector


class UnsupportedQuery(ValueError):
    """A dashboard expression outside the PromQL subset this renderer evaluates."""


# ---- recorded samples -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Recording:
    """Scrapes over time: metric name -> labels -> [(unix time, value)], in time order; `times`: scrape instants."""

    interval: float
    times: list[float] = dataclasses.field(default_factory=list)
    series: dict[str, dict[Labels, list[tuple[float, float]]]] = dataclasses.field(default_factory=dict)

    def add(self, at: float, samples: dict[tuple[str, Labels], float]) -> None:
        """One scrape of every target, taken at `at`."""
        self.times.append(at)
        for (name, labels), value in samples.items():
            self.series.setdefault(name, {}).setdefault(labels, []).append((at, value))

    def to_json(self) -> dict:
        return {"interval": self.interval, "times": self.times,
                "series": [{"name": name, "labels": dict(labels), "points": points}
                           for name, by_labels in self.series.items() for labels, points in by_labels.items()]}

    @classmethod
    def from_json(cls, document: dict) -> Recording:
        recording = cls(document["interval"], list(document["times"]))
        for entry in document["series"]:
            labels = tuple(sorted(entry["labels"].items()))
            recording.series.setdefault(entry["name"], {})[labels] = [tuple(p) for p in entry["points"]]
        return recording


# ---- scraping ---------------------------------------------------------------------------------------------------
def scrape_targets(ready: dict) -> list[tuple[str, str]]:
    """(job, metrics address) of every service in a mesh's ready file that exports metrics."""
    services = [("gateway", ready.get("gateway")), ("scheduler", ready.get("scheduler"))]
    services += [("worker", info) for info in ready.get("workers", []) + ready.get("shards", [])]
    return [(JOBS[kind], info["metrics_address"]) for kind, info in services if info and info.get("metrics_address")]


def scrape(job: str, address: str, timeout: float = 5.0) -> dict[tuple[str, Labels], float]:
    """One target's samples, labelled with `job` and `instance` as Prometheus labels what it scrapes."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    target = {"job": job, "instance": address}
    return {(s.name, tuple(sorted({**s.labels, **target}.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape_all(targets: list[tuple[str, str]]) -> dict[tuple[str, Labels], float]:
    """Every target's samples; a target that does not answer is reported and left out of this round."""
    samples: dict[tuple[str, Labels], float] = {}
    for job, address in targets:
        try:
            samples.update(scrape(job, address))
        except OSError as error:  # a restarting service: its panels show a gap, as in Prometheus
            print(f"render.py: {job} at {address} did not answer: {error}", file=sys.stderr)
    return samples


def record(targets: list[tuple[str, str]], duration: float, interval: float) -> Recording:
    """Scrape `targets` every `interval` seconds for `duration` seconds."""
    recording = Recording(interval)
    start = time.monotonic()
    for tick in range(int(duration // interval) + 1):
        # A fixed schedule (not sleep-after-scrape) keeps the spacing even when a scrape is slow.
        time.sleep(max(0.0, start + tick * interval - time.monotonic()))
        recording.add(time.time(), scrape_all(targets))
    return recording


# ---- the PromQL subset: tokens and syntax tree ------------------------------------------------------------------
TOKEN = re.compile(r"""\s*(?:
    (?P<duration>\d+(?:ms|s|m|h))(?![\w.])
  | (?P<number>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)
  | (?P<ident>[A-Za-z_:][\w:]*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<op>!=|=~|!~|[-+*/(){}\[\],=])
)""", re.X)
DURATION_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
SUBSET = "sum, sum by (...), rate(name[window]), histogram_quantile(q, ...), + - * / and numbers"


@dataclasses.dataclass(frozen=True)
class Number:
    value: float


@dataclasses.dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, "=" or "!=", value)
    window: float | None = None  # seconds, for a range selector (only inside rate)


@dataclasses.dataclass(frozen=True)
class Rate:
    selector: Selector


@dataclasses.dataclass(frozen=True)
class Sum:
    by: tuple[str, ...] | None  # None: sum everything into one series with no labels
    expr: object


@dataclasses.dataclass(frozen=True)
class HistogramQuantile:
    quantile: float
    expr: object


@dataclasses.dataclass(frozen=True)
class Binary:
    op: str
    left: object
    right: object


def tokenize(expr: str) -> list[tuple[str, str]]:
    """(kind, text) pairs; a character no token of the subset starts with is refused."""
    tokens, position = [], 0
    while position < len(expr.rstrip()):
        match = TOKEN.match(expr, position)
        if match is None:
            raise UnsupportedQuery(f"{expr!r}: {expr[position:].strip()[:20]!r} is not supported; "
                                   f"the renderer evaluates only {SUBSET}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


class Parser:
    """Recursive descent over the subset; precedence as in PromQL (`*` and `/` bind tighter than `+` and `-`)."""

    def __init__(self, expr: str) -> None:
        self.expr, self.tokens, self.next = expr, tokenize(expr), 0

    def parse(self) -> object:
        tree = self.sum_of_terms()
        if self.peek():
            self.refuse(f"unexpected {self.peek()!r}")
        return tree

    def peek(self) -> str | None:
        return self.tokens[self.next][1] if self.next < len(self.tokens) else None

    def take(self, expected: str | None = None, kind: str | None = None) -> str:
        if self.next >= len(self.tokens):
            self.refuse("it ends too early")
        token_kind, text = self.tokens[self.next]
        if (expected is not None and text != expected) or (kind is not None and token_kind != kind):
            self.refuse(f"expected {expected or kind}, found {text!r}")
        self.next += 1
        return text

    def refuse(self, why: str) -> None:
        raise UnsupportedQuery(f"{self.expr!r}: {why}; the renderer evaluates only {SUBSET}")

    def sum_of_terms(self) -> object:
        tree = self.product()
        while self.peek() in ("+", "-"):
            tree = Binary(self.take(), tree, self.product())
        return tree

    def product(self) -> object:
        tree = self.operand()
        while self.peek() in ("*", "/"):
            tree = Binary(self.take(), tree, self.operand())
        return tree

    def operand(self) -> object:
        kind, text = self.tokens[self.next] if self.next < len(self.tokens) else (None, None)
        if text == "(":
            self.take("(")
            tree = self.sum_of_terms()
            self.take(")")
            return tree
        if kind == "number":
            return Number(float(self.take()))
        if kind != "ident":
            self.refuse(f"expected a number, a selector or a function, found {text or 'the end'!r}")
        name = self.take()
        if name == "sum":
            return self.aggregation()
        if self.peek() == "(":
            return self.function(name)
        selector = self.selector(name)
        if selector.window is not None:
            self.refuse(f"the range selector {name}[...] is allowed only inside rate()")
        return selector

    def aggregation(self) -> Sum:
        by = self.grouping()  # `sum by (l) (v)`
        self.take("(")
        expr = self.sum_of_terms()
        self.take(")")
        return Sum(by if by is not None else self.grouping(), expr)  # or `sum (v) by (l)`

    def grouping(self) -> tuple[str, ...] | None:
        if self.peek() in ("without", "offset"):
            self.refuse(f"{self.peek()!r} is not supported")
        if self.peek() != "by":
            return None
        self.take("by")
        self.take("(")
        labels = [self.take(kind="ident")]
        while self.peek() == ",":
            self.take(",")
            labels.append(self.take(kind="ident"))
        self.take(")")
        return tuple(labels)

    def function(self, name: str) -> object:
        self.take("(")
        if name == "rate":
            selector = self.selector(self.take(kind="ident"))
            if selector.window is None:
                self.refuse("rate() needs a range selector, name[window]")
            tree = Rate(selector)
        elif name == "histogram_quantile":
            quantile = float(self.take(kind="number"))
            self.take(",")
            tree = HistogramQuantile(quantile, self.sum_of_terms())
        else:
            self.refuse(f"the function {name}() is not supported")
        self.take(")")
        return tree

    def selector(self, name: str) -> Selector:
        matchers = []
        if self.peek() == "{":
            self.take("{")
            while self.peek() != "}":
                label, op = self.take(kind="ident"), self.take()
                if op not in ("=", "!="):
                    self.refuse(f"the matcher {op!r} is not supported (only = and !=)")
                matchers.append((label, op, json.loads(self.take(kind="string"))))
                if self.peek() == ",":
                    self.take(",")
            self.take("}")
        window = None
        if self.peek() == "[":
            self.take("[")
            duration = self.take(kind="duration")
            window = float(duration.rstrip("mshd")) * DURATION_SECONDS[duration.lstrip("0123456789")]
            self.take("]")
        if self.peek() == "offset":
            self.refuse("'offset' is not supported")
        return Selector(name, tuple(matchers), window)


def parse(expr: str, window: float = 60.0) -> object:
    """The syntax tree of a dashboard expression, `$__rate_interval` standing for `window` seconds;
    UnsupportedQuery when it leaves the subset."""
    return Parser(expr.replace("$__rate_interval", f"{window * 1000:.0f}ms")).parse()


def metric_names(tree: object) -> set[str]:
    """Every metric name a syntax tree selects."""
    if isinstance(tree, Selector):
        return {tree.name}
    children = [getattr(tree, f.name) for f in dataclasses.fields(tree)]
    return set().union(*(metric_names(c) for c in children if dataclasses.is_dataclass(c)))


# ---- the PromQL subset: evaluation ------------------------------------------------------------------------------
def evaluate(expr: str, recording: Recording, at: float, window: float) -> Value:
    """`expr` at time `at` over `recording`, with `$__rate_interval` standing for `window` seconds."""
    return _eval(parse(expr, window), recording, at)


def _eval(tree: object, recording: Recording, at: float) -> Value:
    if isinstance(tree, Number):
        return tree.value
    if isinstance(tree, Selector):
        return {labels: points[i - 1][1] for labels, points in _select(tree, recording)
                if (i := bisect.bisect_right(points, (at, math.inf))) and at - points[i - 1][0] <= LOOKBACK}
    if isinstance(tree, Rate):
        return _rate(tree.selector, recording, at)
    if isinstance(tree, Sum):
        return _sum(_vector(_eval(tree.expr, recording, at)), tree.by)
    if isinstance(tree, HistogramQuantile):
        return _histogram_quantile(tree.quantile, _vector(_eval(tree.expr, recording, at)))
    left, right = _eval(tree.left, recording, at), _eval(tree.right, recording, at)
    return _binary(tree.op, left, right)


def _vector(value: Value) -> Vector:
    if not isinstance(value, dict):
        raise UnsupportedQuery("sum() and histogram_quantile() take a vector, not a number")
    return value


def _select(selector: Selector, recording: Recording) -> Iterator[tuple[Labels, list[tuple[float, float]]]]:
    """The series of the selector's metric whose labels satisfy its matchers (an absent label reads as "")."""
    for labels, points in recording.series.get(selector.name, {}).items():
        found = dict(labels)
        if all((found.get(label, "") == value) == (op == "=") for label, op, value in selector.matchers):
            yield labels, points


def _rate(selector: Selector, recording: Recording, at: float) -> Vector:
    """Per-second increase over the samples in (at - window, at], counter resets undone; needs two samples.

    Unlike Prometheus this does not extrapolate to the window's edges: with a handful of scrapes per window the
    extrapolation mostly adds noise, and for a steady counter both give the same rate."""
    rates = {}
    for labels, points in _select(selector, recording):
        inside = points[bisect.bisect_right(points, (at - selector.window, math.inf)):
                        bisect.bisect_right(points, (at, math.inf))]
        if len(inside) < 2:
            continue
        increase = sum(b - a if b >= a else b for (_, a), (_, b) in zip(inside, inside[1:]))
        rates[labels] = increase / (inside[-1][0] - inside[0][0])
    return rates


def _sum(vector: Vector, by: tuple[str, ...] | None) -> Vector:
    totals: Vector = {}
    for labels, value in vector.items():
        key = tuple((k, v) for k, v in labels if by is not None and k in by)
        totals[key] = totals.get(key, 0.0) + value
    return totals


def _histogram_quantile(quantile: float, buckets: Vector) -> Vector:
    """Prometheus's histogram_quantile: linear interpolation inside the bucket holding the rank."""
    groups: dict[Labels, list[tuple[float, float]]] = {}
    for labels, count in buckets.items():
        found = dict(labels)
        if "le" in found:
            rest = tuple((k, v) for k, v in labels if k != "le")
            groups.setdefault(rest, []).append((float(found["le"]), count))
    return {labels: _quantile(quantile, sorted(group)) for labels, group in groups.items()}


def _quantile(quantile: float, buckets: list[tuple[float, float]]) -> float:
    """`buckets`: (upper bound, cumulative count) by bound, ending at +Inf."""
    if not buckets or buckets[-1][0] != math.inf or buckets[-1][1] <= 0:
        return math.nan  # no observations in the window: a gap, as in Grafana
    rank = quantile * buckets[-1][1]
    index = next(i for i, (_, count) in enumerate(buckets) if count >= rank)
    if index == len(buckets) - 1:
        return buckets[-2][0] if len(buckets) > 1 else math.nan  # the rank is above the last finite bound
    lower, below = buckets[index - 1] if index > 0 else (0.0, 0.0)
    upper, count = buckets[index]
    return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper


OPERATORS: dict[str, Callable[[float, float], float]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": lambda a, b: a / b if b else (math.nan if a == 0 else math.copysign(math.inf, a)),  # IEEE, as PromQL
}


def _binary(op: str, left: Value, right: Value) -> Value:
    """Number with number, number with each element, or vector with vector matched one-to-one on all labels."""
    apply = OPERATORS[op]
    if not isinstance(left, dict) and not isinstance(right, dict):
        return apply(left, right)
    if not isinstance(left, dict):
        return {labels: apply(left, value) for labels, value in right.items()}
    if not isinstance(right, dict):
        return {labels: apply(value, right) for labels, value in left.items()}
    return {labels: apply(value, right[labels]) for labels, value in left.items() if labels in right}


# ---- the dashboard ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    expr: str
    legend: str  # Grafana's legendFormat: `{{label}}` stands for the label's value


@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # "timeseries", or "bargauge" (one bar per series: the reduction named by `calc`)
    unit: str  # Grafana's unit id
    grid: tuple[int, int, int, int]  # gridPos x, y, w, h on Grafana's 24-column grid
    targets: tuple[Target, ...]
    calc: str = "lastNotNull"


def load_panels(path: pathlib.Path = DASHBOARD) -> list[Panel]:
    """The dashboard's panels with their queries (rows, which hold no query, are skipped)."""
    panels = []
    for panel in json.loads(path.read_text())["panels"]:
        if panel["type"] == "row":
            continue
        grid = panel["gridPos"]
        calcs = panel.get("options", {}).get("reduceOptions", {}).get("calcs") or ["lastNotNull"]
        panels.append(Panel(panel["title"], panel["type"], panel["fieldConfig"]["defaults"].get("unit", "short"),
                            (grid["x"], grid["y"], grid["w"], grid["h"]),
                            tuple(Target(t["expr"], t.get("legendFormat", "")) for t in panel["targets"]), calcs[0]))
    return panels


def legend(target: Target, labels: Labels) -> str:
    """The series' name as Grafana would show it."""
    if not target.legend:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in labels) + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: dict(labels).get(m.group(1), ""), target.legend)


def panel_series(panel: Panel, recording: Recording, window: float) -> dict[str, list[tuple[float, float]]]:
    """Each series of the panel (by legend): its value at every scrape instant, NaN where it has none (a gap in
    the line, as Grafana draws a missing point)."""
    found: dict[str, dict[float, float]] = {}
    for target in panel.targets:
        for at in recording.times:
            value = evaluate(target.expr, recording, at, window)
            for labels, number in (value.items() if isinstance(value, dict) else [((), value)]):
                found.setdefault(legend(target, labels), {})[at] = number
    return {name: [(at, values.get(at, math.nan)) for at in recording.times] for name, values in found.items()}


# ---- drawing ----------------------------------------------------------------------------------------------------
# Grafana's dark theme and its classic palette, so the picture reads as the dashboard it stands for.
THEME = {"figure": "#111217", "panel": "#181b1f", "grid": "#2c3235", "text": "#ccccdc", "muted": "#8e8e9e"}
PALETTE = ["#73bf69", "#f2cc0c", "#5794f2", "#ff780a", "#f2495c", "#b877d9", "#8ab8ff", "#ffb357", "#96d98d"]
UNIT_LABELS = {"s": "seconds", "reqps": "requests/s", "ops": "per second", "percentunit": "percent",
               "short": "count", "none": ""}


def unit_label(unit: str) -> str:
    return unit.removeprefix("suffix:") if unit.startswith("suffix:") else UNIT_LABELS.get(unit, unit)


def format_tick(value: float, unit: str) -> str:
    """A tick label in the panel's unit: milliseconds below a second, percent, or k/M abbreviations."""
    if unit == "percentunit":
        return f"{value * 100:.2g}%"
    if unit == "s":
        return f"{value * 1000:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def reduce(points: list[tuple[float, float]], calc: str) -> float:
    """A bar gauge's number from a series (Grafana's reductions: mean, max, lastNotNull)."""
    values = [v for _, v in points if math.isfinite(v)]
    if not values:
        return math.nan
    return {"mean": sum(values) / len(values), "max": max(values)}.get(calc, values[-1])


def style_axes(ax, panel: Panel) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_facecolor(THEME["panel"])
    ax.set_ylabel(unit_label(panel.unit), color=THEME["muted"], fontsize=8)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_tick(v, panel.unit)))
    ax.tick_params(colors=THEME["muted"], labelsize=7, length=2)
    ax.grid(color=THEME["grid"], linewidth=0.6)
    for spine in ax.spines.values():
        spine.set_visible(False)


def draw_timeseries(ax, series: dict[str, list[tuple[float, float]]], start: float, span: float) -> None:
    for color, (name, points) in zip(PALETTE * 4, series.items()):
        times, values = [t - start for t, _ in points], [v for _, v in points]
        ax.plot(times, values, color=color, linewidth=1.2, label=name)
        ax.fill_between(times, values, color=color, alpha=0.08)
    ax.set_xlim(0, span)
    ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1] * 1.05, 1e-9))
    # Beside the plot, as the dashboard's legends are (placement "right"), so no line hides behind it.
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False, labelcolor=THEME["text"],
              handlelength=1.0, borderaxespad=0.0, labelspacing=0.35)


def draw_bars(ax, series: dict[str, list[tuple[float, float]]], calc: str) -> None:
    names = list(series)
    ax.bar(range(len(names)), [reduce(series[n], calc) for n in names],
           color=[PALETTE[i % len(PALETTE)] for i in range(len(names))], width=0.6, zorder=2)
    ax.set_xticks(range(len(names)), names, fontsize=7, color=THEME["text"])
    ax.set_xlabel(f"{calc} over the range", color=THEME["muted"], fontsize=8)


def panel_axes(figure, grid: tuple[int, int, int, int], rows: int, size: tuple[float, float], legend: float):
    """A card at the panel's gridPos (24 columns, `rows` grid rows below a header) and the plot area inside it,
    `legend` inches left free on its right."""
    from matplotlib.patches import FancyBboxPatch

    width, height = size
    header, margin, gap = 0.75, 0.12, 0.08  # inches
    unit_w, unit_h = (width - 2 * margin) / 24, (height - header - margin) / rows
    x, y, w, h = grid
    left, top = margin + x * unit_w + gap / 2, height - header - y * unit_h - gap / 2
    card_w, card_h = w * unit_w - gap, h * unit_h - gap
    figure.patches.append(FancyBboxPatch((left / width, (top - card_h) / height), card_w / width, card_h / height,
                                         boxstyle="round,pad=0,rounding_size=0.004", transform=figure.transFigure,
                                         facecolor=THEME["panel"], edgecolor=THEME["grid"], linewidth=0.8, zorder=-1))
    # Inside the card: room for the title above, tick labels and unit to the left, tick labels below.
    pad_left, pad_right, pad_top, pad_bottom = 0.62, 0.12 + legend, 0.3, 0.42
    ax = figure.add_axes(((left + pad_left) / width, (top - card_h + pad_bottom) / height,
                          (card_w - pad_left - pad_right) / width, (card_h - pad_top - pad_bottom) / height))
    return ax, ((left + 0.1) / width, (top - 0.08) / height)


def render(panels: list[Panel], recording: Recording, out: pathlib.Path, window: float,
           title: str = "moemesh", size: tuple[float, float] = (14, 10), dpi: int = 100) -> None:
    """One PNG: every panel where the dashboard's grid puts it, drawn from `recording`."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    from matplotlib import pyplot

    rows = max(y + h for _, y, _, h in (p.grid for p in panels))
    figure = pyplot.figure(figsize=size, dpi=dpi, facecolor=THEME["figure"])
    start, span = recording.times[0], recording.times[-1] - recording.times[0]
    for panel in panels:
        ax, title_at = panel_axes(figure, panel.grid, rows, size, legend=1.45 if panel.kind == "timeseries" else 0)
        figure.text(*title_at, panel.title, color=THEME["text"], fontsize=9.5, fontweight="bold", va="top")
        style_axes(ax, panel)
        series = {name: points for name, points in panel_series(panel, recording, window).items()
                  if any(math.isfinite(v) for _, v in points)}
        if not series:
            ax.text(0.5, 0.5, "No data", transform=ax.transAxes, ha="center", color=THEME["muted"])
        elif panel.kind == "bargauge":
            draw_bars(ax, series, panel.calc)
        else:
            draw_timeseries(ax, series, start, span)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))
    figure.text(0.12 / size[0], 1 - 0.12 / size[1], title, color=THEME["text"], fontsize=15, fontweight="bold",
                va="top")
    figure.text(0.12 / size[0], 1 - 0.45 / size[1],
                f"{when}: {span:.0f} s of a live mesh, scraped every {recording.interval:g} s; rate window "
                f"{window:g} s; x axes in seconds since the first scrape", color=THEME["muted"], fontsize=9, va="top")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, facecolor=THEME["figure"])
    pyplot.close(figure)


# ---- command line -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="render.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ready-file", type=pathlib.Path, help="a running mesh's ready file: scrape it")
    parser.add_argument("--duration", type=float, default=90.0, help="seconds to scrape for (default 90)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes (default 2)")
    parser.add_argument("--scrapes", type=pathlib.Path,
                        help="JSON of the samples: written after scraping, or read when there is no --ready-file")
    parser.add_argument("--rate-window", type=float,
                        help="seconds that $__rate_interval stands for (default four scrape intervals)")
    parser.add_argument("--dashboard", type=pathlib.Path, default=DASHBOARD, help="the Grafana JSON model")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    if args.ready_file is None and args.scrapes is None:
        parser.error("give --ready-file (scrape a running mesh) or --scrapes (draw recorded samples)")
    if args.ready_file is not None:
        if args.interval <= 0 or args.duration < args.interval:
            parser.error("--interval must be positive and --duration at least one interval")
        targets = scrape_targets(json.loads(args.ready_file.read_text()))
        if not targets:
            parser.error(f"{args.ready_file} names no metrics endpoint (are metrics on?)")
        print(f"render.py: scraping {len(targets)} endpoints every {args.interval:g} s for {args.duration:g} s",
              file=sys.stderr)
        recording = record(targets, args.duration, args.interval)
        if args.scrapes is not None:
            args.scrapes.write_text(json.dumps(recording.to_json()))
    else:
        recording = Recording.from_json(json.loads(args.scrapes.read_text()))
    panels = load_panels(args.dashboard)
    window = args.rate_window or 4 * recording.interval  # Grafana's $__rate_interval is at least 4 scrapes
    for panel in panels:  # refuse an expression outside the subset before drawing anything
        for target in panel.targets:
            parse(target.expr, window)
    title = json.loads(args.dashboard.read_text()).get("title", "moemesh")
    render(panels, recording, args.out, window, title=title)
    print(f"render.py: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UnsupportedQuery as error:
        sys.exit(f"render.py: {error}")
