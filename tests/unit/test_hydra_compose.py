"""alignctl/config/compose.py: composition through Hydra's public API, and the one piece Hydra has no
public function for (the basic sweeper's expansion), checked against Hydra's own sweeper so that a
Hydra release that changes it fails here."""

from __future__ import annotations

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # the reference, in the test only
from hydra.core.override_parser.overrides_parser import OverridesParser

from alignctl.cli import app as hydra_app
from alignctl.config import compose as hydra_compose

SWEEPS = [
    ["recipe.lr=0.1,0.2", "seed=1"],
    ["recipe.lr=0.1,0.2", "seed=range(3)", "adapter=lora,dora"],
    ["seed=1", "seed=2,3"],  # a key given twice keeps its last value, at its first position
    ["recipe.lr=choice(0.1,0.3)", "+extra=x,y", "recipe.beta=0.5"],
    ["recipe.lr=1e-4", "data.path='a,b'"],  # a quoted comma is a value, not a sweep
    ["recipe.beta=range(0,1,step=0.5)"],
]


@pytest.mark.parametrize("overrides", SWEEPS)
def test_the_expansion_is_hydra_s_basic_sweeper_s(overrides):
    expected = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0]
    assert hydra_compose.expand_overrides(overrides) == expected


def test_glob_over_a_group_lists_the_group_inside_a_session():
    with hydra_compose.session():
        jobs = hydra_compose.expand_overrides(["adapter=glob(*)"], with_config_loader=True)
    assert [job[0] for job in jobs] == [f"adapter={option}" for option in hydra_app.group_options("adapter")]


def test_a_sweep_the_basic_sweeper_cannot_enumerate_is_refused():
    with pytest.raises(hydra_compose.SweepTypeError, match="INTERVAL_SWEEP"):
        hydra_compose.expand_overrides(["recipe.lr=interval(0.1,0.2)"])


def test_fixed_overrides_leave_the_sweeps_out():
    assert hydra_compose.fixed_overrides(["recipe.lr=0.1,0.2", "seed=1", "adapter=glob(*)", "data.path='a,b'"]) == ["seed=1", "data.path='a,b'"]


def test_a_user_config_dir_is_searched_where_hydra_s_main_puts_it(tmp_path):
    """Hydra's main adds --config-dir after the application's config path, before its structured
    configs: a new option is found there, and a file of the same name as alignctl's does not replace it."""
    from hydra._internal.utils import create_config_search_path  # the reference, in the test only
    from hydra.core.config_search_path import SearchPathQuery

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "mine.yaml").write_text((hydra_app.conf_dir() / "adapter" / "lora.yaml").read_text().replace("r: 8", "r: 3"))
    assert hydra_app.compose_config(["adapter=mine"], config_dir=str(tmp_path)).adapter.r == 3

    (tmp_path / "adapter" / "dora.yaml").write_text("kind: dora\nr: 5\n")
    assert hydra_app.compose_config(["adapter=dora"], config_dir=str(tmp_path)).adapter.r == 8  # alignctl's file comes first

    expected = create_config_search_path(str(hydra_app.conf_dir()))  # what Hydra's main builds for --config-dir
    expected.prepend(provider="command-line", path=f"file://{tmp_path}", anchor=SearchPathQuery(provider="schema"))
    with hydra_compose.session(str(tmp_path)) as session:
        sources = session.compose("config", []).hydra.runtime.config_sources
    plain = [e.path.removeprefix("file://") for e in expected.get_path()]
    assert [f"{s.schema}://{s.path}".removeprefix("file://") for s in sources] == plain


def test_a_command_line_searchpath_keeps_its_entries_and_gains_the_config_dir():
    got = hydra_compose.config_dir_overrides("/x", ["seed=1", "hydra.searchpath=[pkg://a]"])
    assert got == ["seed=1", "hydra.searchpath=[pkg://a,file:///x]"]
    assert hydra_compose.config_dir_overrides(None, ["seed=1"]) == ["seed=1"]


def test_composition_leaves_no_global_hydra_behind():
    from hydra.core.global_hydra import GlobalHydra

    hydra_app.compose_config(["recipe=sft"])
    assert not GlobalHydra.instance().is_initialized()
