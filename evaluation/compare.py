"""Two runs of the same episodes compared pair by pair: `sim_eval.py compare A.json B.json`.

Episodes pair by (task, init state, seed): the simulators are deterministic given those, so a pair
differs only by its policy. Per task and overall: both success rates, B - A with a 95% interval for
paired proportions (Newcombe's square-and-add interval, as Fagerland, Lydersen and Laake's
contingencytables computes it), McNemar's exact conditional p-value, and the discordant pairs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

from evaluation import SetupError
from evaluation.records import EpisodeRecord, records_of
from evaluation.stats import finite_or_none, mean_interval, wilson_interval

# The task settings that decide a score; two runs that differ in one are not comparable (--force).
SCORE_SETTINGS = ("convention", "max_episode_steps", "settle_steps", "flip_images", "state_vector", "image_size",
                  "simulator_stack", "renderer")
EpisodeKey = Tuple[str, int, Optional[int], Any]  # task, init state, seed, latency


@dataclass
class PairedComparison:
    """One group of paired episodes: how often each run succeeded, and whether B differs from A."""

    name: str
    pairs: int
    both: int  # both succeeded
    only_a: int  # A succeeded, B failed
    only_b: int  # B succeeded, A failed
    neither: int

    @property
    def rate_a(self) -> float:
        return (self.both + self.only_a) / self.pairs if self.pairs else 0.0

    @property
    def rate_b(self) -> float:
        return (self.both + self.only_b) / self.pairs if self.pairs else 0.0

    def interval(self) -> Tuple[float, float]:
        """95% interval of B's success rate minus A's."""
        return paired_difference_interval(self.both, self.only_b, self.only_a, self.neither)[1:]

    def p_value(self) -> float:
        return mcnemar_exact_p(self.only_a, self.only_b)

    def as_json(self) -> Dict[str, Any]:
        low, high = self.interval()
        return {**asdict(self), "rate_a": self.rate_a, "rate_b": self.rate_b, "difference": self.rate_b - self.rate_a,
                "difference_95": [low, high], "mcnemar_exact_p": self.p_value(),
                "discordant": self.only_a + self.only_b}


@dataclass
class PairedReturns:
    """One group of paired episodes of tasks without a success criterion: both mean returns, and B's
    minus A's with its 95% paired Student's t interval."""

    name: str
    pairs: int
    mean_a: float
    mean_b: float
    difference: float
    low: float
    high: float

    def as_json(self) -> Dict[str, Any]:
        return {"name": self.name, "pairs": self.pairs, "measure": "return", "mean_return_a": self.mean_a,
                "mean_return_b": self.mean_b, "difference": self.difference,
                "difference_95": [finite_or_none(self.low), finite_or_none(self.high)]}



def paired_difference_interval(n11: int, n12: int, n21: int, n22: int) -> Tuple[float, float, float]:
    """(estimate, low, high) of p1+ - p+1 for the paired 2x2 table [[n11, n12], [n21, n22]] (rows:
    the first measurement, columns: the second): Newcombe's square-and-add 95% interval, with his
    continuity adjustment of the correlation."""
    total = n11 + n12 + n21 + n22
    if total == 0:
        return 0.0, -1.0, 1.0
    row, column = (n11 + n12) / total, (n11 + n21) / total
    row_low, row_high = wilson_interval(n11 + n12, total)
    column_low, column_high = wilson_interval(n11 + n21, total)
    margins = (n11 + n12) * (n21 + n22) * (n11 + n21) * (n12 + n22)
    product = n11 * n22 - n12 * n21
    if margins == 0 or 0 <= product <= total / 2:
        correlation = 0.0
    else:
        correlation = (product - total / 2 if product > 0 else product) / math.sqrt(margins)

    def spread(first: float, second: float) -> float:
        return math.sqrt(max(0.0, first * first + second * second - 2 * correlation * first * second))

    estimate = row - column
    return (estimate, estimate - spread(row - row_low, column_high - column),
            estimate + spread(column - column_low, row_high - row))


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """McNemar's exact conditional test, two-sided: the discordant pairs against a fair coin."""
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1)) / 2 ** discordant
    return min(1.0, 2 * tail)


def load_run(path: str) -> Dict[str, Any]:
    """A results file as sim_eval.py wrote it; SetupError naming what is wrong otherwise."""
    try:
        with open(path) as results_file:
            content = json.load(results_file)
        episodes = records_of(content)
    except OSError as error:
        raise SetupError(f"cannot read {path}: {error.strerror}") from None
    except SetupError as error:
        raise SetupError(f"{path}: {error}") from None
    except (ValueError, KeyError, TypeError) as error:
        raise SetupError(f"{path} is not a sim_eval.py results file ({type(error).__name__}: {error})") from None
    return {"path": path, "episodes": episodes, "task_settings": content.get("task_settings", {}),
            "policy": content.get("run", {}).get("policy")}


def setting_differences(run_a: Dict[str, Any], run_b: Dict[str, Any], tasks: List[str]) -> List[str]:
    """One line per score-deciding setting in which the two runs differ, task by task."""
    lines = []
    for task in tasks:
        settings_a, settings_b = run_a["task_settings"].get(task, {}), run_b["task_settings"].get(task, {})
        for key in SCORE_SETTINGS:
            value_a, value_b = settings_a.get(key), settings_b.get(key)
            if isinstance(value_a, dict) and isinstance(value_b, dict):
                lines += [f"{task}: {key}.{name} {value_a.get(name)!r} vs {value_b.get(name)!r}"
                          for name in sorted(set(value_a) | set(value_b)) if value_a.get(name) != value_b.get(name)]
            elif value_a != value_b:
                lines.append(f"{task}: {key} {value_a!r} vs {value_b!r}")
    return lines


def scored(episodes: List[EpisodeRecord]) -> Dict[EpisodeKey, EpisodeRecord]:
    """Records by episode key; episodes a server loss cut short are no score and left out."""
    return {(r.task, r.init_state_index, r.seed, r.latency_steps): r for r in episodes if r.failure != "server_lost"}


def group(name: str, keys: List[EpisodeKey], episodes_a: Dict[EpisodeKey, EpisodeRecord],
          episodes_b: Dict[EpisodeKey, EpisodeRecord]) -> PairedComparison:
    outcomes = [(episodes_a[key].success is True, episodes_b[key].success is True) for key in keys]
    return PairedComparison(name=name, pairs=len(outcomes), both=outcomes.count((True, True)),
                            only_a=outcomes.count((True, False)), only_b=outcomes.count((False, True)),
                            neither=outcomes.count((False, False)))


def return_group(name: str, keys: List[EpisodeKey], episodes_a: Dict[EpisodeKey, EpisodeRecord],
                 episodes_b: Dict[EpisodeKey, EpisodeRecord]) -> PairedReturns:
    """Tasks without a success criterion: both mean returns and B - A with a paired t interval."""
    returns_a = [episodes_a[key].sum_reward for key in keys]
    returns_b = [episodes_b[key].sum_reward for key in keys]
    difference, low, high = mean_interval([b - a for a, b in zip(returns_a, returns_b)])
    return PairedReturns(name=name, pairs=len(keys), mean_a=sum(returns_a) / len(keys),
                         mean_b=sum(returns_b) / len(keys), difference=difference, low=low, high=high)


def compare_runs(path_a: str, path_b: str, force: bool = False) -> Dict[str, Any]:
    """Pair the two runs' episodes and compare them per task and overall: success tasks by their
    paired success rates, tasks without a success criterion by their paired returns ("overall" and,
    for a run with both kinds, "overall_return"). SetupError when no episode pairs, or when a
    score-deciding setting differs and `force` is not given."""
    run_a, run_b = load_run(path_a), load_run(path_b)
    episodes_a, episodes_b = scored(run_a["episodes"]), scored(run_b["episodes"])
    keys = sorted(set(episodes_a) & set(episodes_b), key=lambda key: (key[0], key[1], key[2] is None, key[2] or 0))
    if not keys:
        raise SetupError(f"{path_a} and {path_b} have no episode in common (pairs are task, init state and seed)")
    tasks = sorted({key[0] for key in keys})
    differences = setting_differences(run_a, run_b, tasks)
    if differences and not force:
        raise SetupError("the runs differ in settings that decide a score (--force compares them anyway): "
                         + "; ".join(differences))
    by_return = {key[0] for key in keys if episodes_a[key].success is None or episodes_b[key].success is None}
    rows: List[Any] = []
    for task in tasks:
        task_keys = [key for key in keys if key[0] == task]
        rows.append((return_group if task in by_return else group)(task, task_keys, episodes_a, episodes_b))
    success_keys = [key for key in keys if key[0] not in by_return]
    return_keys = [key for key in keys if key[0] in by_return]
    comparison = {
        "a": {"path": path_a, "policy": run_a["policy"], "unpaired": len(set(episodes_a) - set(keys))},
        "b": {"path": path_b, "policy": run_b["policy"], "unpaired": len(set(episodes_b) - set(keys))},
        "setting_differences": differences, "tasks": rows,
        "overall": group("overall", success_keys, episodes_a, episodes_b) if success_keys else
        return_group("overall", return_keys, episodes_a, episodes_b),
    }
    if success_keys and return_keys:
        comparison["overall_return"] = return_group("overall (return)", return_keys, episodes_a, episodes_b)
    return comparison


def comparison_json(comparison: Dict[str, Any]) -> Dict[str, Any]:
    return {**comparison, "tasks": [row.as_json() for row in comparison["tasks"]],
            **{key: comparison[key].as_json() for key in ("overall", "overall_return") if key in comparison}}


def overall_rows(comparison: Dict[str, Any]) -> List[Any]:
    return [comparison[key] for key in ("overall", "overall_return") if key in comparison]


COLUMNS = ("task", "pairs", "A", "B", "B - A [95%]", "A only", "B only", "McNemar p")


def comparison_rows(comparison: Dict[str, Any]) -> List[Tuple[str, ...]]:
    """The cells under COLUMNS, per task and then overall, as text."""
    rows = []
    for row in comparison["tasks"] + overall_rows(comparison):
        if isinstance(row, PairedReturns):
            rows.append((row.name, str(row.pairs), f"return {row.mean_a:.4g}", f"return {row.mean_b:.4g}",
                         f"{row.difference:+.4g} [{row.low:+.4g}, {row.high:+.4g}]", "—", "—", "—"))
            continue
        low, high = row.interval()
        rows.append((row.name, str(row.pairs), f"{row.rate_a:.1%}", f"{row.rate_b:.1%}",
                     f"{row.rate_b - row.rate_a:+.1%} [{low:+.1%}, {high:+.1%}]", str(row.only_a), str(row.only_b),
                     f"{row.p_value():.4g}"))
    return rows


def comparison_notes(comparison: Dict[str, Any]) -> List[str]:
    """What a reader must know beside the table: settings that differ, episodes left out."""
    notes = [f"settings differ (--force): {line}" for line in comparison["setting_differences"]]
    notes += [f"{side['unpaired']} episode(s) of {side['path']} have no pair and are left out"
              for side in (comparison["a"], comparison["b"]) if side["unpaired"]]
    return notes


def print_comparison(comparison: Dict[str, Any]) -> None:
    """A table: per task and overall, both rates, B - A with its 95% interval, discordant pairs, p."""
    a, b = comparison["a"], comparison["b"]
    print(f"A: {a['path']} ({a['policy']})\nB: {b['path']} ({b['policy']})")
    for note in comparison_notes(comparison):
        print(f"note: {note}")
    rows = [COLUMNS, *comparison_rows(comparison)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
