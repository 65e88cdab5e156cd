"""A latency sweep's summary (`--latency 0,1,2,4`): success at each latency with its 95% interval,
and the paired drop from the baseline latency (0 when swept) with McNemar's exact p, as a table,
JSON and an SVG chart of success against latency."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from evaluation.compare import PairedComparison
from evaluation.records import EpisodeRecord
from evaluation.stats import wilson_interval


@dataclass
class LatencyRow:
    """Success at one latency, and the paired change from the baseline latency."""

    latency: Any  # D, "measured" or a model's text
    episodes: int
    successes: int
    mean_steps: float  # how long its episodes ran: a latency may slow a policy down before it fails it
    paired: Optional[PairedComparison]  # None for the baseline itself

    @property
    def rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    def interval(self) -> Tuple[float, float]:
        return wilson_interval(self.successes, self.episodes)

    def as_json(self) -> Dict[str, Any]:
        low, high = self.interval()
        row = {"latency_steps": self.latency, "episodes": self.episodes, "successes": self.successes,
               "success_rate": self.rate, "success_95": [low, high], "mean_steps": self.mean_steps}
        if self.paired is not None:
            row["paired_with_baseline"] = self.paired.as_json()
        return row


def latency_order(label: Any) -> Tuple[int, Any]:
    """Fixed steps first, ascending; then measured and models by name."""
    return (0, label) if isinstance(label, int) else (1, str(label))


def latency_rows(records: List[EpisodeRecord]) -> List[LatencyRow]:
    """One row per latency of a sweep over tasks with a success criterion; [] unless two or more
    latencies ran."""
    scored = [r for r in records if r.success is not None and r.failure != "server_lost"]
    labels = sorted({r.latency_steps for r in scored if r.latency_steps is not None}, key=latency_order)
    if len(labels) < 2:
        return []
    baseline = 0 if 0 in labels else labels[0]
    by_latency = {label: {(r.task, r.init_state_index): r for r in scored if r.latency_steps == label}
                  for label in labels}
    outcomes = {label: {key: r.success for key, r in arm.items()} for label, arm in by_latency.items()}
    rows = []
    for label in labels:
        paired = None if label == baseline else paired_with(outcomes[baseline], outcomes[label], f"latency {label}")
        steps = [r.steps for r in by_latency[label].values()]
        rows.append(LatencyRow(label, len(steps), sum(outcomes[label].values()), sum(steps) / len(steps), paired))
    return rows


def paired_with(baseline: Dict[Tuple[Any, ...], bool], other: Dict[Tuple[Any, ...], bool],
                name: str) -> PairedComparison:
    """The episodes both arms ran (keys: sortable episode tuples), as a paired 2x2 table (A: the
    baseline, B: the other): a latency against latency 0, a perturbed episode against its twin."""
    keys = sorted(set(baseline) & set(other))
    count = {(a, b): 0 for a in (True, False) for b in (True, False)}
    for key in keys:
        count[(baseline[key], other[key])] += 1
    return PairedComparison(name, len(keys), count[(True, True)], count[(True, False)], count[(False, True)],
                            count[(False, False)])


def print_latency_table(rows: List[LatencyRow]) -> None:
    """The sweep as text: success per latency, and the paired drop from the baseline."""
    print(f"{'latency':>10s}  episodes  success  95% interval  mean steps    paired change  95% interval     "
          "McNemar p")
    for row in rows:
        low, high = row.interval()
        line = (f"{str(row.latency):>10s}  {row.episodes:8d}  {row.rate:7.2f}  [{low:.2f}, {high:.2f}]  "
                f"{row.mean_steps:10.1f}")
        if row.paired is not None:
            change_low, change_high = row.paired.interval()
            line += (f"    {row.paired.rate_b - row.paired.rate_a:+13.2f}  [{change_low:+.2f}, {change_high:+.2f}]"
                     f"  {row.paired.p_value():10.3g}")
        else:
            line += "    (baseline)"
        print(line)


def latency_svg(rows: List[LatencyRow], width: int = 520, height: int = 260) -> str:
    """Success against latency, each point with its 95% interval, as inline SVG (no plotting library)."""
    left, right, top, bottom = 50, 20, 15, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    step = plot_w / max(1, len(rows) - 1)

    def y(rate: float) -> float:
        return top + (1 - rate) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="latency-chart">',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#555"/>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#555"/>']
    for tick in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{left - 8}" y="{y(tick) + 4:.1f}" text-anchor="end" font-size="11">{tick:.1f}</text>')
    points = []
    for i, row in enumerate(rows):
        x = left + i * step if len(rows) > 1 else left + plot_w / 2
        low, high = row.interval()
        points.append(f"{x:.1f},{y(row.rate):.1f}")
        parts.append(f'<line x1="{x:.1f}" y1="{y(low):.1f}" x2="{x:.1f}" y2="{y(high):.1f}" stroke="#888"/>')
        parts.append(f'<circle cx="{x:.1f}" cy="{y(row.rate):.1f}" r="4" fill="#2a6fb0"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle" font-size="11">'
                     f'{html.escape(str(row.latency))}</text>')
    parts.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="#2a6fb0"/>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle" font-size="12">'
                 'latency (control steps)</text>')
    parts.append(f'<text x="12" y="{top + plot_h / 2:.1f}" font-size="12" transform="rotate(-90 12 '
                 f'{top + plot_h / 2:.1f})" text-anchor="middle">success</text></svg>')
    return "".join(parts)


def latency_section(rows: List[LatencyRow]) -> str:
    """The report's real-time section: the chart and the table; "" for a run that is not a sweep."""
    if not rows:
        return ""
    cells = []
    for row in rows:
        low, high = row.interval()
        change = "baseline"
        if row.paired is not None:
            change_low, change_high = row.paired.interval()
            change = (f"{row.paired.rate_b - row.paired.rate_a:+.2f} [{change_low:+.2f}, {change_high:+.2f}], "
                      f"McNemar p {row.paired.p_value():.3g} ({row.paired.pairs} pairs)")
        cells.append(f"<tr><td>{html.escape(str(row.latency))}</td><td>{row.episodes}</td>"
                     f"<td>{row.rate:.2f} [{low:.2f}, {high:.2f}]</td><td>{row.mean_steps:.1f}</td>"
                     f"<td>{html.escape(change)}</td></tr>")
    return (f"<h2>Success against latency</h2>\n{latency_svg(rows)}\n<table class=\"meta latency\"><tr><th>latency"
            f"</th><th>episodes</th><th>success [95%]</th><th>mean steps</th><th>paired change from baseline</th>"
            f"</tr>{''.join(cells)}</table>")
