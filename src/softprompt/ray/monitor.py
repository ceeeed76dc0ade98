"""The run's live view: our Prometheus series, read from Ray's metrics endpoints, as one HTML page.

    with monitor.live(run_dir):          # the driver, around a Ray Train run or a Tune sweep
        ...                              # <run_dir>/monitor.html is rewritten every few seconds

Ray's dashboard draws time series only through Prometheus and Grafana, and a Grafana build cannot
be installed from the package registries this project uses (Debian's `prometheus` can; see
docs/monitoring.md). So the driver reads the same series Ray exports for Prometheus
(`ray_softprompt_*`: tokens/s, step time, train loss, eval metric, trials by state) straight from
every node's metrics endpoint, keeps their history, and rewrites `<run_dir>/monitor.html`: a page
with no scripts that reloads itself, one chart per series and a table of the latest values. The
page is best effort: an unreachable endpoint skips a sample, it never stops training.
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PAGE = "monitor.html"
"""The live view's file in the run folder."""
INTERVAL_S = 5.0
"""Seconds between two reads of the metrics endpoints (Ray exports every few seconds)."""
KEEP = 720
"""Points kept per series (an hour at the default interval); older ones are dropped."""
PREFIX = "ray_softprompt_"

CHARTS = (
    ("tokens_per_second", "tokens/s per worker", ("trial", "worker")),
    ("step_time_seconds", "mean step time (s) per worker", ("trial", "worker")),
    ("train_loss", "train loss per worker", ("trial", "worker")),
    ("eval_metric", "eval metric per trial", ("trial", "metric")),
    ("trials", "trials by state", ("state",)),
)
"""(series without the prefix, chart title, the tags that name a line)."""

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<tags>[^}]*)\})?\s+(?P<value>\S+)')
_TAG = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d")


@dataclass
class History:
    """Every series' points, by (series, line name): (seconds since the start, value)."""

    started: float = field(default_factory=time.time)
    points: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)
    _step_sums: dict[str, tuple[float, float]] = field(default_factory=dict)

    def add(self, text: str, now: float | None = None) -> None:
        """Add one read of Prometheus text: gauges as they are, the step-time histogram as the mean
        step time since the previous read (its sum and count differences)."""
        t = (now if now is not None else time.time()) - self.started
        sums: dict[str, list[float]] = {}
        for line in text.splitlines():
            m = _SAMPLE.match(line)
            if not m or not m["name"].startswith(PREFIX):
                continue
            try:
                value = float(m["value"])
            except ValueError:
                continue
            name, tags = m["name"][len(PREFIX) :], dict(_TAG.findall(m["tags"] or ""))
            for series, _, keys in CHARTS:
                label = " ".join(f"worker {tags[k]}" if k == "worker" else tags[k] for k in keys if k in tags)
                if name == series:
                    self._put(series, label, t, value)
                elif series == "step_time_seconds" and name in (f"{series}_sum", f"{series}_count"):
                    sums.setdefault(label, [0.0, 0.0])[name.endswith("_count")] += value
        for label, (total, count) in sums.items():
            before = self._step_sums.get(label)
            self._step_sums[label] = (total, count)
            if before is not None and count > before[1]:
                self._put("step_time_seconds", label, t, (total - before[0]) / (count - before[1]))

    def _put(self, series: str, label: str, t: float, value: float) -> None:
        line = self.points.setdefault((series, label or "all"), [])
        line.append((t, value))
        del line[:-KEEP]


def live(run_dir: str | Path, interval_s: float = INTERVAL_S) -> contextlib.AbstractContextManager[History]:
    """Keep `<run_dir>/monitor.html` up to date while the block runs (in a daemon thread), and
    write it once more at the end. Needs a connected Ray (it asks it for the nodes' endpoints)."""
    return _live(Path(run_dir), interval_s)


@contextlib.contextmanager
def _live(run_dir: Path, interval_s: float) -> Iterator[History]:
    history, stop = History(), threading.Event()
    page = run_dir / PAGE

    def tick(final: bool = False) -> None:
        for url in endpoints():
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    history.add(r.read().decode("utf-8", "replace"))
            except OSError as exc:
                log.debug("metrics endpoint %s: %s", url, exc)
        write_page(page, history, run_dir.resolve().name, interval_s, final=final)

    def loop() -> None:
        while not stop.wait(interval_s):
            tick()

    thread = threading.Thread(target=loop, name="softprompt-monitor", daemon=True)
    tick()
    thread.start()
    try:
        yield history
    finally:
        stop.set()
        thread.join(timeout=interval_s + 10)
        with contextlib.suppress(OSError):
            tick(final=True)


def endpoints() -> list[str]:
    """The Prometheus endpoints (`http://NODE:PORT/metrics`) of the connected Ray's live nodes."""
    import ray

    if not ray.is_initialized():
        return []
    try:
        nodes = ray.nodes()
    except (ray.exceptions.RayError, RuntimeError, OSError) as exc:  # Ray going away at shutdown: best effort
        log.debug("cannot list Ray's nodes: %s", exc)
        return []
    return [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in nodes if n.get("Alive") and n.get("MetricsExportPort")
    ]


def write_page(path: Path, history: History, run: str, interval_s: float = INTERVAL_S, *, final: bool = False) -> None:
    """Write the live view (atomically: a reader never sees half a page)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render(history, run, interval_s, final=final), encoding="utf-8")
    os.replace(tmp, path)


def render(history: History, run: str, interval_s: float = INTERVAL_S, *, final: bool = False) -> str:
    """The page: one chart per series (a line per trial and worker), then the latest values."""
    e = html.escape
    refresh = "" if final else f'<meta http-equiv="refresh" content="{max(1, round(interval_s))}">'
    state = "finished: last values" if final else f"live, reloads every {interval_s:g} s"
    charts, rows = [], []
    for series, title, _ in CHARTS:
        lines = {label: pts for (s, label), pts in sorted(history.points.items()) if s == series}
        charts.append(_chart(title, lines))
        rows += [f"<tr><td>{e(series)}</td><td>{e(label)}</td><td>{pts[-1][1]:.4g}</td></tr>" for label, pts in lines.items()]
    table = "".join(rows) or '<tr><td colspan="3">no samples yet: Ray exports the first ones a few seconds after training starts</td></tr>'
    return (
        f'<!doctype html><html><head><meta charset="utf-8">{refresh}<title>softprompt {e(run)}</title>'
        "<style>body{font:14px sans-serif;margin:20px}svg{margin:6px;border:1px solid #ddd}"
        "table{border-collapse:collapse}td,th{padding:2px 10px;border-bottom:1px solid #eee;text-align:left}</style>"
        f'</head><body><h1>softprompt run {e(run)}</h1><p id="state">{e(state)}; updated {time.strftime("%H:%M:%S")}, '
        f"{time.time() - history.started:.0f} s after the view started. Series: Ray's <code>{PREFIX}*</code>.</p>"
        f'<div>{"".join(charts)}</div><h2>Latest values</h2><table id="latest"><tr><th>series</th><th>line</th>'
        f"<th>value</th></tr>{table}</table></body></html>"
    )


def _chart(title: str, lines: dict[str, list[tuple[float, float]]]) -> str:
    """An SVG line chart over seconds since the start, one coloured line per entry of `lines`."""
    rows = max(1, -(-len(lines) // 2))  # legend rows, two labels each
    w, left, top, bottom = 440, 52, 24, 24 + 14 * rows
    h = 180 + bottom
    pts = [p for line in lines.values() for p in line]
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{html.escape(title)}">'
    parts = [f'<text x="{left}" y="16" font-weight="bold">{html.escape(title)}</text>']
    if not pts:
        parts.append(f'<text x="{left}" y="{h // 2}" fill="#888">no samples yet</text>')
        return head + "".join(parts) + "</svg>"
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-9)
    pw, ph = w - left - 10, h - top - bottom

    def xy(x: float, y: float) -> tuple[str, str]:
        return f"{left + (x - x0) / (x1 - x0) * pw:.1f}", f"{top + ph - (y - y0) / (y1 - y0) * ph:.1f}"

    parts += [f'<text x="4" y="{top + 8}" font-size="11">{y1:.3g}</text>', f'<text x="4" y="{top + ph}" font-size="11">{y0:.3g}</text>',
              f'<text x="{left}" y="{top + ph + 14}" font-size="11">{x0:.0f} s</text>',
              f'<text x="{w - 60}" y="{top + ph + 14}" font-size="11">{x1:.0f} s</text>']
    for i, (label, line) in enumerate(lines.items()):
        color = _COLORS[i % len(_COLORS)]
        coords = [xy(x, y) for x, y in line]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(f"{cx},{cy}" for cx, cy in coords)}"/>')
        if len(line) <= 60:  # Ray exports a gauge only while it is being set: a sparse series shows as dots
            parts += [f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>' for cx, cy in coords]
        parts.append(f'<text x="{left + (i % 2) * 190}" y="{top + ph + 30 + (i // 2) * 14}" font-size="11" fill="{color}">{html.escape(label[:34])}</text>')
    return head + "".join(parts) + "</svg>"
