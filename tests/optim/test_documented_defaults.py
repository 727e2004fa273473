"""Every preset's defaults are what the docs say: docs/defaults.md holds one row per preset of
``lrgrad.OPTIMIZERS`` (and docs/apollo.md restates the APOLLO/Fira presets'); each documented value
must equal the value the preset's constructor puts in its param group. A default changed in the
code without the docs, or in the docs without the code, fails here, as does a preset without a row.
The docs are parsed, not copied: the expected values are read from the pages at test time."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import lrgrad

DOCS = Path(__file__).resolve().parents[2] / "docs"
#: the columns of docs/defaults.md's preset table that hold one value each (the others hold key=value pairs)
SINGLE_VALUE_COLUMNS = ("projector", "rule", "lr", "weight_decay", "rank", "update_proj_gap", "scale",
                        "moment_policy")
PAIR_COLUMNS = ("rule options", "full-rank update")


def parse_value(text: str) -> Any:
    """A documented value: a Python literal, ``√N`` (``math.sqrt(N)``) or a bare name (a string)."""
    text = text.strip()
    if text.startswith("√"):
        return math.sqrt(float(text[1:]))
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text), f"not a value: {text!r}"
        return text


def markdown_table(page: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the table in ``page`` whose header row starts with ``| first_header |``, as
    {column: cell text}."""
    lines = (DOCS / page).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip().strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells)))
    return rows


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def documented_defaults() -> dict[str, dict[str, Any]]:
    """docs/defaults.md's preset table: {preset: {option: value}}, shared defaults included."""
    shared = {backticked(row["option"])[0]: parse_value(backticked(row["default"])[0])
              for row in markdown_table("defaults.md", "option")}
    presets = {}
    for row in markdown_table("defaults.md", "preset"):
        name = backticked(row["preset"])[0]
        values = dict(shared)
        for column in SINGLE_VALUE_COLUMNS:
            (text,) = backticked(row[column])
            values[column] = parse_value(text)
        for column in PAIR_COLUMNS:
            for pair in backticked(row[column]):
                key, _, text = pair.partition("=")
                values[key.strip()] = parse_value(text)
        values.setdefault("full_rank", None)
        assert name not in presets, f"two rows for {name}"
        presets[name] = values
    return presets


DOCUMENTED = documented_defaults()


def built_defaults(name: str) -> dict[str, Any]:
    """The param group the preset builds for one projected matrix, with no option given."""
    opt = lrgrad.OPTIMIZERS[name]([{"params": [torch.nn.Parameter(torch.zeros(8, 4))]}])
    return opt.param_groups[0]


def test_every_preset_has_one_documented_row():
    assert set(DOCUMENTED) == set(lrgrad.OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(lrgrad.OPTIMIZERS))
def test_documented_defaults_are_the_code_defaults(name):
    assert name in DOCUMENTED, f"{name} has no row in docs/defaults.md"
    group = built_defaults(name)
    documented = DOCUMENTED[name]
    assert len(documented) >= len(SINGLE_VALUE_COLUMNS) + 6  # the table's columns, the shared options, full_rank
    wrong = {key: (value, group.get(key, "<absent>")) for key, value in documented.items()
             if key not in group or group[key] != value or type(group[key]) is bool and value is not group[key]}
    assert not wrong, f"{name}: documented vs code default: {wrong}"


def test_the_apollo_page_states_the_same_defaults():
    """docs/apollo.md's preset table (projector, scale, scale_type, rank, gap, moments) against the code."""
    rows = markdown_table("apollo.md", "preset")
    assert {backticked(row["preset"])[0] for row in rows} == {"APOLLOAdamW", "APOLLOMiniAdamW", "FiraAdamW"}
    words = {"given": None, "kept": "keep", "reset": "reset", "projected": "project"}
    for row in rows:
        name = backticked(row["preset"])[0]
        group = built_defaults(name)
        assert group["projector"] == backticked(row["projector"])[0], name
        assert group["scale"] == parse_value(row["scale"]), name
        assert group["scale_type"] == row["scale_type"], name
        assert group["rank"] == (words[row["rank"]] if row["rank"] in words else parse_value(row["rank"])), name
        assert group["update_proj_gap"] == parse_value(row["gap"]), name
        assert group["moment_policy"] == words[row["moments at a refresh"]], name
        assert DOCUMENTED[name]["scale"] == group["scale"]  # and the two pages agree


def test_the_parser_reads_what_the_table_writes():
    """The value syntax: literals, √N, bare names; a malformed value is an error, not a string."""
    assert parse_value("0.25") == 0.25 and parse_value("√128") == math.sqrt(128.0)
    assert parse_value("(0.9, 0.999)") == (0.9, 0.999) and parse_value("None") is None
    assert parse_value('"fira"') == "fira" and parse_value("keep") == "keep" and parse_value("False") is False
    with pytest.raises(AssertionError):
        parse_value("0.25 (the paper's)")
