"""How a run reads to people: success rates with 95% Wilson intervals, a text table, a chart, and
one self-contained HTML page."""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from evaluation.records import EpisodeRecord, task_group
from evaluation.robustness import robustness_rows, robustness_section
from evaluation.stats import finite_or_none, mean_interval, wilson_interval
from evaluation.sweep import latency_rows, latency_section


@dataclass
class Row:
    """One line of a run's summary: a group of episodes and its score with a 95% interval. A task with
    a success criterion is scored by its success rate (Wilson interval); one without (has_success
    false) by its mean return (Student's t interval), never by a made-up rate."""

    name: str
    episodes: int
    measure: str  # "success" (a rate in [0, 1]) or "return" (the mean summed reward)
    value: float
    low: float
    high: float
    mean_steps: float
    mean_seconds: float

    @property
    def is_rate(self) -> bool:
        return self.measure == "success"

    def as_json(self) -> Dict[str, Any]:
        common = {"episodes": self.episodes, "measure": self.measure, "mean_steps": self.mean_steps,
                  "mean_seconds": self.mean_seconds}
        if self.is_rate:
            return {**common, "successes": round(self.value * self.episodes), "success_rate": self.value,
                    "ci95": [self.low, self.high]}
        return {**common, "mean_return": self.value, "ci95": [finite_or_none(self.low), finite_or_none(self.high)]}

    def score_text(self) -> str:
        """"85.0% of 20 [62, 95]" or "return 21.4 of 20 [18.2, 24.6]"."""
        if self.is_rate:
            return f"{100 * self.value:.1f}% of {self.episodes} [{100 * self.low:.0f}, {100 * self.high:.0f}]"
        return f"return {self.value:.4g} of {self.episodes} [{self.low:.4g}, {self.high:.4g}]"



def scored_by_return(records: List[EpisodeRecord]) -> set:
    """The tasks without a success criterion: their records say success null."""
    return {record.task for record in records if record.success is None}


def _row(name: str, group: List[EpisodeRecord], by_return: bool) -> Row:
    steps = float(np.mean([r.steps for r in group]))
    seconds = float(np.mean([r.seconds for r in group]))
    if by_return:
        mean, low, high = mean_interval([r.sum_reward for r in group])
        return Row(name, len(group), "return", mean, low, high, steps, seconds)
    successes = sum(r.success is True for r in group)
    low, high = wilson_interval(successes, len(group))
    return Row(name, len(group), "success", successes / len(group), low, high, steps, seconds)


def summarize(records: List[EpisodeRecord], group_of: Callable[[str], str] = lambda task: task) -> List[Row]:
    """A Row per group of tasks (per task by default), then "overall": success rates for tasks with a
    success criterion, mean returns for those without ("overall (success)" and "overall (return)"
    when a run has both). Episodes a lost server cut short have no return and are left out of those."""
    by_return = scored_by_return(records)
    kept = [r for r in records if r.task not in by_return or r.failure != "server_lost"]
    parts = [(flag, [r for r in kept if (r.task in by_return) == flag]) for flag in (False, True)]
    parts = [(flag, part) for flag, part in parts if part]
    rows = []
    for flag, part in parts:
        groups: Dict[str, List[EpisodeRecord]] = {}
        for record in part:
            groups.setdefault(group_of(record.task), []).append(record)
        rows += [_row(name, group, flag) for name, group in sorted(groups.items())]
    for flag, part in parts:
        name = "overall" if len(parts) == 1 else f"overall ({'return' if flag else 'success'})"
        rows.append(_row(name, part, flag))
    return rows


def summarize_run(records: List[EpisodeRecord], group_of: Callable[[str], str] = lambda task: task) -> List[Row]:
    """summarize(), per latency for a latency sweep (rows named "TASK @ latency D"): a sweep's arms
    are different conditions, never pooled."""
    labels = sorted({r.latency_steps for r in records}, key=lambda label: (not isinstance(label, int), str(label)))
    if len(labels) < 2:
        return summarize(records, group_of)
    rows = []
    for label in labels:
        arm = [r for r in records if r.latency_steps == label]
        rows += [dataclasses.replace(row, name=f"{row.name} @ latency {label}") for row in summarize(arm, group_of)]
    return rows


def summary_json(records: List[EpisodeRecord]) -> Dict[str, Any]:
    """Per task and overall (per latency in a sweep): episodes and the score with its 95% interval (see Row)."""
    return {row.name: row.as_json() for row in summarize_run(records)}


def print_table(rows: List[Row]) -> None:
    """summarize()'s rows as a text table on stdout."""
    width = max([len(row.name) for row in rows] + [4])
    print(f"{'task':{width}s}  episodes  {'score':>15s}  {'95% interval':18s}  mean steps  mean s")
    for row in rows:
        if row.is_rate:
            score, interval = f"success {row.value:.2f}", f"[{row.low:.2f}, {row.high:.2f}]"
        else:
            score, interval = f"return {row.value:.4g}", f"[{row.low:.4g}, {row.high:.4g}]"
        print(f"{row.name:{width}s}  {row.episodes:8d}  {score:>15s}  {interval:18s}  {row.mean_steps:10.1f}  "
              f"{row.mean_seconds:6.2f}")


def save_chart(rows: List[Row], path: str) -> None:
    """summarize()'s success rates with their 95% intervals as a PNG bar chart (matplotlib, which the
    runner checks before it starts); tasks scored by return are left out of it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row.is_rate]
    if not rows:
        print("sim_eval: no task of this run has a success criterion: no success chart drawn", file=sys.stderr)
        return
    names = [f"{row.name.split('/')[-1][:40]} (n={row.episodes})" for row in rows]
    rates = np.array([row.value for row in rows])
    errors = np.clip(np.array([[row.value - row.low for row in rows], [row.high - row.value for row in rows]]), 0,
                     None)
    figure, axes = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    colors = ["#dd8452" if row.name.startswith("overall") else "#4c72b0" for row in rows]
    axes.barh(names, rates, xerr=errors, capsize=3, color=colors)
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
.return { color: #5a6272; }
img.frame, video { width: 128px; image-rendering: pixelated; margin-right: 4px; }
"""


def _cell(value: Any) -> str:
    return html.escape(value if isinstance(value, str) else json.dumps(value))


def _bars(rows: List[Row]) -> str:
    """Success rates as bars with their intervals; a task scored by return is a line of text."""
    lines = ['<div class="chart">']
    for row in rows:
        lines.append(f'<div class="label">{html.escape(row.name)}</div>')
        if row.is_rate:
            kind = "bar overall" if row.name.startswith("overall") else "bar"
            lines.append(f'<div class="track"><div class="{kind}" style="width:{100 * row.value:.2f}%"></div>'
                         f'<div class="interval" style="left:{100 * row.low:.2f}%;'
                         f'width:{100 * (row.high - row.low):.2f}%"></div></div>')
        else:
            lines.append('<div class="return">mean return (no success criterion)</div>')
        lines.append(f"<div>{html.escape(row.score_text())}</div>")
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


def _latency(record: EpisodeRecord) -> str:
    return "" if record.latency_steps is None else f" @ latency {html.escape(str(record.latency_steps))}"


def episode_outcome(record: EpisodeRecord) -> str:
    """"success", the failure, or for a task without a success criterion its return and how it ended."""
    if record.success is None:
        return f"return {record.sum_reward:.4g} ({record.failure or 'ended'})"
    return "success" if record.success else (record.failure or "failure")


def outcome_class(record: EpisodeRecord) -> str:
    return "return" if record.success is None else ("success" if record.success else "failure")


def _invocations(invocations: List[Dict[str, Any]]) -> str:
    """Every invocation that wrote the results file: started, finished, command."""
    rows = "".join(f"<tr><td>{html.escape(str(item.get('started_at')))}</td>"
                   f"<td>{html.escape(str(item.get('finished_at')))}</td>"
                   f"<td><code>{html.escape(' '.join(map(str, item.get('command') or [])))}</code></td></tr>"
                   for item in invocations)
    return f"<h2>Invocations ({len(invocations)})</h2>\n<table class=\"meta invocations\"><tr><th>started</th>" \
           f"<th>finished</th><th>command</th></tr>{rows}</table>"


def write_report(path: str, evaluation, comparison=None) -> None:
    """One self-contained HTML page of a finished Evaluation: provenance, success bars with 95% intervals,
    every episode; with `comparison` (compare_runs' result, or the reason it was refused) the paired
    comparison with another run."""
    results = sorted(evaluation.results, key=lambda r: (str(r.latency_steps), r.task, r.init_state_index))
    run = evaluation.run_info()
    meta = "".join(f"<tr><td>{html.escape(key)}</td><td><code>{_cell(value)}</code></td></tr>"
                   for key, value in run.items())
    servers = "".join(f"<tr><td>{html.escape(address)}</td><td><code>{_cell(info)}</code></td></tr>"
                      for address, info in evaluation.servers.items())
    settings = "".join(f"<tr><td>{html.escape(task)}</td><td><code>{_cell(values)}</code></td></tr>"
                       for task, values in sorted(evaluation.task_settings.items()))
    suites = summarize_run(results, task_group)
    episodes = []
    for record in results:
        outcome = episode_outcome(record)
        episodes.append(
            f'<tr class="episode"><td>{html.escape(record.task)}{_latency(record)}</td>'
            f'<td>{record.init_state_index}</td>'
            f'<td>{_cell(record.seed)}</td>'
            f'<td class="{outcome_class(record)}">{html.escape(outcome)}</td>'
            f'<td>{record.steps}</td><td>{record.seconds:.1f}</td><td>{_media(record, evaluation.thumbnails)}'
            f'</td></tr>')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation report</title><style>{REPORT_STYLE}</style></head>
<body>
<h1>Evaluation report: {html.escape(run["policy"])}</h1>
<table class="meta">{meta}</table>
<h2>Score by suite</h2>
{_bars(suites)}
<h2>Score by task</h2>
{_bars(summarize_run(results))}
{latency_section(latency_rows(results))}
{robustness_section(robustness_rows(results, evaluation.settings.baseline_records))}
{_comparison(comparison)}
<h2>Episodes ({len(results)})</h2>
<table class="episodes"><tr><th>task</th><th>init state</th><th>seed</th><th>outcome</th><th>steps</th>
<th>seconds</th><th>video or first and last frame</th></tr>
{"".join(episodes)}
</table>
{_invocations(evaluation.invocations())}
<h2>Servers</h2>
<table class="meta">{servers}</table>
<h2>Task settings that decide the score</h2>
<table class="meta">{settings}</table>
</body></html>
"""
    with open(path, "w") as report_file:
        report_file.write(page)
