"""How a run reads to people: success rates with 95% Wilson intervals, a text table, a chart, and
one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import sys
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from evaluation.records import EpisodeRecord, task_group

# (name, episodes, success rate, 95% low, 95% high, mean steps, mean seconds)
Row = Tuple[str, int, float, float, float, float, float]

Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> Tuple[float, float]:
    """The Wilson score interval of a success rate (95% by default): honest at 0% and 100% too."""
    if n == 0:
        return 0.0, 1.0
    rate = successes / n
    denominator = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, round(centre - half, 12)), min(1.0, round(centre + half, 12))


def summarize(records: List[EpisodeRecord], group_of: Callable[[str], str] = lambda task: task) -> List[Row]:
    """(name, episodes, success rate, 95% low, 95% high, mean steps, mean seconds) per group of
    tasks (per task by default), then "overall"."""
    rows = []
    by_group: Dict[str, List[EpisodeRecord]] = {}
    for record in records:
        by_group.setdefault(group_of(record.task), []).append(record)
    for name, group in sorted(by_group.items()) + [("overall", records)]:
        if group:
            successes = sum(bool(r.success) for r in group)
            low, high = wilson_interval(successes, len(group))
            rows.append((name, len(group), successes / len(group), low, high,
                         float(np.mean([r.steps for r in group])), float(np.mean([r.seconds for r in group]))))
    return rows


def summary_json(records: List[EpisodeRecord]) -> Dict[str, Any]:
    """Per task and overall: episodes, successes, rate and its 95% Wilson interval."""
    return {row[0]: {"episodes": row[1], "successes": round(row[2] * row[1]), "success_rate": row[2],
                     "ci95": [row[3], row[4]], "mean_steps": row[5], "mean_seconds": row[6]}
            for row in summarize(records)}


def print_table(rows: List[Row]) -> None:
    """summarize()'s rows as a text table on stdout."""
    width = max([len(row[0]) for row in rows] + [4])
    print(f"{'task':{width}s}  episodes  success  95% interval  mean steps  mean s")
    for name, count, rate, low, high, steps, seconds in rows:
        print(f"{name:{width}s}  {count:8d}  {rate:7.2f}  [{low:4.2f}, {high:4.2f}]  {steps:10.1f}  {seconds:6.2f}")


def save_chart(rows: List[Row], path: str) -> None:
    """summarize()'s success rates with their 95% intervals as a PNG bar chart (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("hint: pip install matplotlib to draw the success chart", file=sys.stderr)
        return
    names = [f"{row[0].split('/')[-1][:40]} (n={row[1]})" for row in rows]
    rates = np.array([row[2] for row in rows])
    errors = np.clip(np.array([[row[2] - row[3] for row in rows], [row[4] - row[2] for row in rows]]), 0, None)
    figure, axes = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    axes.barh(names, rates, xerr=errors, capsize=3, color=["#4c72b0"] * (len(rows) - 1) + ["#dd8452"])
    axes.set_xlim(0, 1)
    axes.invert_yaxis()
    axes.set_xlabel("success rate (bars: 95% Wilson interval)")
    figure.tight_layout()
    figure.savefig(path)


REPORT_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #1d2330; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; } td, th { padding: 4px 10px; border-bottom: 1px solid #e3e6ec; text-align: left;
  vertical-align: top; }
.meta td:first-child { color: #5a6272; } code { font-size: 12px; }
.chart { display: grid; grid-template-columns: minmax(180px, 38%) 1fr 150px; gap: 6px 12px; align-items: center; }
.track { position: relative; height: 18px; background: #eef0f4; border-radius: 3px; }
.bar { position: absolute; left: 0; top: 0; bottom: 0; background: #4c72b0; border-radius: 3px; }
.bar.overall { background: #dd8452; }
.interval { position: absolute; top: 8px; height: 2px; background: #1d2330; }
.interval::before, .interval::after { content: ""; position: absolute; top: -5px; width: 2px; height: 12px;
  background: #1d2330; }
.interval::before { left: 0; } .interval::after { right: 0; }
.success { color: #1a7f37; font-weight: 600; } .failure { color: #b42318; font-weight: 600; }
img.frame, video { width: 128px; image-rendering: pixelated; margin-right: 4px; }
"""


def _cell(value: Any) -> str:
    return html.escape(value if isinstance(value, str) else json.dumps(value))


def _bars(rows: List[Row]) -> str:
    lines = ['<div class="chart">']
    for name, count, rate, low, high, _, _ in rows:
        kind = "bar overall" if name == "overall" else "bar"
        lines.append(f'<div class="label">{html.escape(name)}</div><div class="track">'
                     f'<div class="{kind}" style="width:{100 * rate:.2f}%"></div>'
                     f'<div class="interval" style="left:{100 * low:.2f}%;width:{100 * (high - low):.2f}%"></div>'
                     f'</div><div>{100 * rate:.1f}% of {count} [{100 * low:.0f}, {100 * high:.0f}]</div>')
    lines.append("</div>")
    return "\n".join(lines)


def _media(record: EpisodeRecord, thumbnails: Dict[Tuple[str, int], List[str]]) -> str:
    video = record.video
    if video and os.path.exists(video) and os.path.getsize(video) < 8 * 2**20:
        with open(video, "rb") as video_file:
            data = base64.b64encode(video_file.read()).decode("ascii")
        if video.endswith(".mp4"):
            return f'<video controls muted loop src="data:video/mp4;base64,{data}"></video>'
        return f'<img class="frame" alt="episode" src="data:image/gif;base64,{data}">'
    frames = thumbnails.get((record.task, record.init_state_index))
    if frames:
        return "".join(f'<img class="frame" alt="{which} frame" src="data:image/png;base64,{frame}">'
                       for which, frame in zip(("first", "last"), frames))
    return "—"


def _comparison(comparison) -> str:
    """The section of a --compare-with run: the paired table, or why the runs were not compared."""
    if comparison is None:
        return ""
    if isinstance(comparison, str):
        return f'<h2>Compared with another run</h2>\n<p class="failure">not compared: {html.escape(comparison)}</p>'
    from evaluation.compare import COLUMNS, comparison_notes, comparison_rows

    head = "".join(f"<th>{html.escape(column)}</th>" for column in COLUMNS)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                   for row in comparison_rows(comparison))
    notes = "".join(f"<p>{html.escape(note)}</p>" for note in comparison_notes(comparison))
    return (f'<h2>Compared with another run, pair by pair</h2>\n<p>A: <code>{html.escape(comparison["a"]["path"])}'
            f'</code> ({html.escape(str(comparison["a"]["policy"]))}); B: this run. B - A with a 95% interval for '
            f"paired proportions, McNemar's exact p-value.</p>{notes}\n"
            f'<table class="episodes comparison"><tr>{head}</tr>{rows}</table>')


def write_report(path: str, evaluation, comparison=None) -> None:
    """One self-contained HTML page of a finished Evaluation: provenance, success bars with 95% intervals,
    every episode; with `comparison` (compare_runs' result, or the reason it was refused) the paired
    comparison with another run."""
    results = sorted(evaluation.results, key=lambda r: (r.task, r.init_state_index))
    run = evaluation.run_info()
    meta = "".join(f"<tr><td>{html.escape(key)}</td><td><code>{_cell(value)}</code></td></tr>"
                   for key, value in run.items())
    servers = "".join(f"<tr><td>{html.escape(address)}</td><td><code>{_cell(info)}</code></td></tr>"
                      for address, info in evaluation.servers.items())
    settings = "".join(f"<tr><td>{html.escape(task)}</td><td><code>{_cell(values)}</code></td></tr>"
                       for task, values in sorted(evaluation.task_settings.items()))
    suites = summarize(results, task_group)
    episodes = []
    for record in results:
        outcome = "success" if record.success else (record.failure or "failure")
        episodes.append(
            f'<tr class="episode"><td>{html.escape(record.task)}</td><td>{record.init_state_index}</td>'
            f'<td>{_cell(record.seed)}</td>'
            f'<td class="{"success" if record.success else "failure"}">{html.escape(outcome)}</td>'
            f'<td>{record.steps}</td><td>{record.seconds:.1f}</td><td>{_media(record, evaluation.thumbnails)}'
            f'</td></tr>')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation report</title><style>{REPORT_STYLE}</style></head>
<body>
<h1>Evaluation report: {html.escape(run["policy"])}</h1>
<table class="meta">{meta}</table>
<h2>Success by suite</h2>
{_bars(suites)}
<h2>Success by task</h2>
{_bars(summarize(results))}
{_comparison(comparison)}
<h2>Episodes ({len(results)})</h2>
<table class="episodes"><tr><th>task</th><th>init state</th><th>seed</th><th>outcome</th><th>steps</th>
<th>seconds</th><th>video or first and last frame</th></tr>
{"".join(episodes)}
</table>
<h2>Servers</h2>
<table class="meta">{servers}</table>
<h2>Task settings that decide the score</h2>
<table class="meta">{settings}</table>
</body></html>
"""
    with open(path, "w") as report_file:
        report_file.write(page)
