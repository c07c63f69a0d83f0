"""`alignctl plan --fit <memory>` through the CLI: the candidates and the proposal as overrides to
paste, the same as JSON, and one line with exit code 2 for a bad size or a budget nothing fits."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_cli_errors import assert_one_line_error


@pytest.fixture
def sft(tmp_path) -> list[str]:
    """recipe=sft on the tiny model and 20 short rows (the built-in task's 30,000 would take seconds to encode)."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": "add " * (1 + i % 5), "completion": "sum " * (1 + i % 9)}) + "\n" for i in range(20)))
    return ["recipe=sft", "data=hf", f"data.path={data}", "data.eval_split=null", "recipe.batch_size=2", "recipe.grad_accum=4", "hardware=gpu"]


def test_fit_prints_the_candidates_and_the_overrides_to_paste(alignctl, sft):
    result = alignctl("plan", *sft, "--fit", "80GiB", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.describe()
    assert f"plan --fit 80GiB ({80 * 2**30:,} bytes) per device" in result.stdout and "estimated peak" in result.stdout
    assert "recipe.batch_size=8 recipe.grad_accum=1 hardware.gradient_checkpointing=false" in result.stdout
    assert "alignctl train recipe=sft" in result.stdout


def test_fit_json_holds_the_same_proposal(alignctl, sft):
    result = alignctl("plan", *sft, "--fit=80GiB", "--json")
    assert result.returncode == 0, result.describe()
    record = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert record["budget"] == 80 * 2**30 and record["per"] == "device" and record["device"] == "cuda"
    assert record["effective_batch"] == 8 and record["proposal"]["peak"] <= record["budget"]
    assert record["proposal"]["overrides"] == ["recipe.batch_size=8", "recipe.grad_accum=1", "hardware.gradient_checkpointing=false"]
    assert record["candidates"][0]["fits"] and record["proposal"]["adapter_change"] is None


@pytest.mark.parametrize("size", ["80G", "lots", "0"])
def test_a_bad_size_is_one_line(alignctl, size):
    assert_one_line_error(alignctl("plan", "--fit", size), f"plan --fit '{size}': not a memory size", "80GiB, 80GB, 512MiB, 1.5TiB")


def test_a_budget_nothing_fits_names_the_smallest_need(alignctl, sft):
    line = assert_one_line_error(alignctl("plan", *sft, "--fit", "1KiB"), "plan --fit 1KiB: nothing fits in that per device on cuda",
                                 "needs an estimated", "give --fit")
    assert "recipe.batch_size=1 recipe.grad_accum=8" in line


def test_other_flags_are_refused_naming_fit(alignctl):
    assert_one_line_error(alignctl("plan", "--bogus"), "plan: unknown flag --bogus", "--fit <memory per device>", "--json")


def test_a_recipe_that_trains_nothing_has_no_batch_to_fit(alignctl):
    assert_one_line_error(alignctl("plan", "recipe=pairs", "--fit", "8GiB"), "recipe=pairs trains nothing")
