"""The docs against the code: every list of simulators names them all, and every local link leads
somewhere."""

import glob
import os
import re

import pytest

from backends import SIMULATORS
from tests.shared import HERE

PAGES = sorted(glob.glob(os.path.join(HERE, "docs", "*.md"))) + [os.path.join(HERE, "README.md")]
NAMES = set(SIMULATORS)
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def simulator_lists(text: str):
    """Every place a page enumerates simulators: a comma-joined token (`libero,mock,...`), a brace
    group (`backends/{libero,...}.py`) of three or more names, or one line with four or more
    backticked names. Fewer is an example (`--simulator libero,mock`) or a group of a table;
    `bench_sim.py --only` takes groups of rows, which share some simulators' names."""
    for token in re.findall(r"\{([a-z_,]+)\}|(?<!--only )\b([a-z_]+(?:,[a-z_]+){2,})\b", text):
        names = set((token[0] or token[1]).split(","))
        if len(names & NAMES) >= 3:
            yield names
    for line in text.splitlines():
        backticked = set(re.findall(r"`([a-z_]+)`", line)) & NAMES
        if len(backticked) >= 4:
            yield backticked


@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_every_simulator_list_in_the_docs_is_the_registry(page):
    text = open(page).read()
    for names in simulator_lists(text):
        assert names == NAMES, f"{os.path.relpath(page, HERE)} lists {sorted(names)}, not {sorted(NAMES)}"


def test_the_list_finder_sees_a_stale_list():
    stale = "| `backends/{libero,robosuite,gymnasium,mock}.py` | the simulators |"
    assert list(simulator_lists(stale)) == [{"libero", "robosuite", "gymnasium", "mock"}]
    four = "`libero`, `mock`, `kitchen` or `gymnasium`"
    assert list(simulator_lists(four)) == [{"libero", "mock", "kitchen", "gymnasium"}]
    assert list(simulator_lists("--simulator libero,mock")) == []


SERVED_TABLES = [("README.md", "## What it serves"), ("docs/backends.md", "## What is served")]


@pytest.mark.parametrize("page, heading", SERVED_TABLES)
def test_the_tables_of_what_is_served_have_every_simulator(page, heading):
    text = open(os.path.join(HERE, page)).read()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    first_two_cells = [" ".join(row.split("|")[1:3]) for row in rows]
    served = {name for cells in first_two_cells for name in re.findall(r"`(?:--simulator )?([a-z_]+)`", cells)}
    assert served & NAMES == NAMES, f"{page}: {heading} lacks {sorted(NAMES - served)}"


@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_every_local_link_in_the_docs_leads_to_a_file(page):
    text = open(page).read()
    for target, _anchor in MARKDOWN_LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        path = os.path.normpath(os.path.join(os.path.dirname(page), target))
        assert os.path.exists(path), f"{os.path.relpath(page, HERE)} links to {target}, which is not there"
