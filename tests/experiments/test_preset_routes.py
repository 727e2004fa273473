"""docs/presets.md: every preset on every route (issue 29, "must show"): the same rank, scale, gap, rule,
full_rank and projector whichever way it is built, except the documented difference, and the page current."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from lrgrad_experiments import preset_routes  # noqa: E402


def test_every_preset_is_the_same_on_every_route_and_the_page_is_current():
    table = preset_routes.rows()
    for entry in table:
        assert preset_routes.disagreements(entry) == [], entry["name"]
        # the documented difference: model.parameters() carries no names, so the embedding and head are projected too
        projected = entry["routes"]["param_groups"]["projected"]
        assert entry["routes"]["direct"]["projected"] == (projected + 2 if projected else 0), entry["name"]
    mini = next(e for e in table if e["name"] == "APOLLOMiniAdamW")["routes"]["Trainer"]
    assert (mini["rank"], mini["full_rank"], mini["scale"]) == (1, "apollo", 128**0.5)
    text = preset_routes.render(table, preset_routes.hf_rows())
    assert preset_routes.OUT.read_text() == text, "docs/presets.md is stale: run python experiments/preset_routes.py"
