"""A robustness report (`--paired-baseline`): each perturbed episode paired with its unperturbed
twin, the base task the simulator names (`task_info["base_task"]`, LIBERO-plus's) started from the
base init state it names, with the same seed, latency and policy.

Per perturbation group (the perturbed task's suite, e.g. libero_plus/camera) and overall: the
perturbed success rate, the baseline's on the same pairs, the drop (perturbed minus baseline) with
Newcombe's paired 95% interval and McNemar's exact p, as `compare` computes them. Twins are run once
and shared: LIBERO-plus perturbs each base episode many ways, so many pairs share one twin, and the
pairs of one group are then not independent; the interval treats them as if they were.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from evaluation.compare import PairedComparison
from evaluation.records import EpisodeRecord
from evaluation.sweep import paired_with

TwinKey = Tuple[str, int, Optional[int], Any]  # task, init state, seed, latency


@dataclass
class RobustnessRow:
    """One group's pairs: A is the unperturbed twin, B the perturbed episode."""

    group: str
    paired: PairedComparison
    unpaired: int  # perturbed episodes whose twin is missing (or failed to run) and are left out

    def as_json(self) -> Dict[str, Any]:
        low, high = self.paired.interval()
        return {"group": self.group, "pairs": self.paired.pairs, "perturbed_success": self.paired.rate_b,
                "baseline_success": self.paired.rate_a, "drop": self.paired.rate_b - self.paired.rate_a,
                "drop_95": [low, high], "mcnemar_exact_p": self.paired.p_value(),
                "only_baseline": self.paired.only_a, "only_perturbed": self.paired.only_b,
                "unpaired": self.unpaired}


def twin_key(record: EpisodeRecord) -> Optional[TwinKey]:
    """The episode a perturbed record pairs with; None for a record that names no base task."""
    if record.base_task is None or record.base_init_state is None:
        return None
    return record.base_task, record.base_init_state, record.seed, record.latency_steps


def twin_jobs(records: List[EpisodeRecord]) -> List[Tuple[str, int, Any]]:
    """The twins the perturbed records need, each once: (base task, base init state, latency)."""
    keys = {key for key in map(twin_key, records) if key is not None}
    return sorted({(task, index, latency) for task, index, _, latency in keys},
                  key=lambda job: (job[0], job[1], str(job[2])))


def group_of(record: EpisodeRecord) -> str:
    group = record.task.rpartition("/")[0] or record.task
    return group if record.latency_steps is None else f"{group} @ latency {record.latency_steps}"


def robustness_rows(records: List[EpisodeRecord], baseline: Optional[List[EpisodeRecord]] = None
                    ) -> List[RobustnessRow]:
    """Per group and overall (last); [] when no record names a base task. The twins come from
    `baseline` (another run's records) or else from `records` themselves."""
    scored = [r for r in records if r.success is not None and r.failure != "server_lost"]
    twins = {(r.task, r.init_state_index, r.seed, r.latency_steps): r.success
             for r in (baseline if baseline is not None else records)
             if r.success is not None and r.failure != "server_lost"}
    perturbed = [r for r in scored if twin_key(r) is not None]
    if not perturbed:
        return []
    groups = sorted({group_of(r) for r in perturbed})
    rows = [paired_row(name, [r for r in perturbed if group_of(r) == name], twins) for name in groups]
    return rows + [paired_row("overall", perturbed, twins)] if len(groups) > 1 else rows


def paired_row(name: str, records: List[EpisodeRecord], twins: Dict[TwinKey, bool]) -> RobustnessRow:
    """The group's perturbed episodes that have a twin, as a paired 2x2 table (A: twin, B: perturbed)."""
    def episode(record: EpisodeRecord) -> Tuple[str, int, str]:
        return record.task, record.init_state_index, str(record.latency_steps)  # sortable across latencies

    paired = [r for r in records if twin_key(r) in twins]
    baseline = {episode(r): twins[twin_key(r)] for r in paired}
    perturbed = {episode(r): bool(r.success) for r in paired}
    return RobustnessRow(name, paired_with(baseline, perturbed, name), len(records) - len(paired))


HEADER = ("group", "pairs", "perturbed", "baseline", "drop [95%]", "McNemar p", "unpaired")


def robustness_cells(row: RobustnessRow) -> Tuple[str, ...]:
    low, high = row.paired.interval()
    drop = row.paired.rate_b - row.paired.rate_a
    return (row.group, str(row.paired.pairs), f"{row.paired.rate_b:.1%}", f"{row.paired.rate_a:.1%}",
            f"{drop:+.1%} [{low:+.1%}, {high:+.1%}]", f"{row.paired.p_value():.3g}", str(row.unpaired))


def print_robustness_table(rows: List[RobustnessRow]) -> None:
    """Per group: perturbed and baseline success on the same pairs, the drop, McNemar's p."""
    table = [HEADER, *map(robustness_cells, rows)]
    widths = [max(len(line[column]) for line in table) for column in range(len(HEADER))]
    print("robustness: each perturbed episode against its unperturbed twin (same init state, seed, policy)")
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def robustness_section(rows: List[RobustnessRow]) -> str:
    """The report's robustness table; "" for a run without pairs."""
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in robustness_cells(row)) + "</tr>"
                   for row in rows)
    return (f"<h2>Robustness: perturbed against unperturbed twins</h2>\n<p>Each perturbed episode is paired "
            f"with its base task's episode from the same init state, seed and policy; drop = perturbed - baseline, "
            f"Newcombe's 95% interval, McNemar's exact p.</p>\n<table class=\"meta robustness\"><tr>{head}</tr>"
            f"{body}</table>")
