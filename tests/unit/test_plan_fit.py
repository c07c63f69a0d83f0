"""`alignctl plan --fit <memory>`: its proposals are within the budget by plan's own estimate (computed
again, apart from the search, on the overrides it proposes), maximal, and reached by the cheapest
memory saver; the data's token lengths are computed once per search."""

from __future__ import annotations

import json

import pytest

from alignctl.cli import plan, plan_data, plan_fit
from alignctl.config.compose import compose_config
from alignctl.config.validation import validate
from alignctl.core.errors import UserError

# Per device 16 rows per optimiser step: candidates 16, 8, 4, 2, 1 (x 1, 2, 4, 8, 16 accumulation).
BATCH = ["recipe.batch_size=4", "recipe.grad_accum=4"]


@pytest.fixture
def overrides(tiny_dir, tmp_path):
    """The tiny model, full fine-tuning, on 40 SFT rows of varied length, planned for a GPU (no process
    or loading on device memory: the figures are the same on any machine)."""
    rows = [{"prompt": "count " * (1 + i % 7), "completion": "one two " * (1 + i % 11)} for i in range(40)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return ["recipe=sft", "model=hf", f"model.name_or_path={tiny_dir}", "data=hf", f"data.path={data}", "data.eval_split=null",
            "hardware=gpu", "recipe.lm_head_chunk=0", "adapter=none", *BATCH]


def estimate(args: list[str]) -> float:
    """plan's peak for these overrides, from scratch: Hydra composes them, the data is read again."""
    cfg = validate(compose_config(args))
    return plan.peak(plan.recipe_models(cfg, plan.batch_shape), plan.settle_for_plan(cfg)).total


def fit(args: list[str], budget: float) -> plan_fit.Fit:
    shapes = plan_data.BatchShapes()
    return plan_fit.search(validate(compose_config(args)), args, budget, lambda composed: plan.estimate_of(composed, shapes))


def with_(args: list[str], *more: str) -> list[str]:
    keys = {m.split("=", 1)[0] for m in more}
    return [a for a in args if a.split("=", 1)[0] not in keys] + list(more)


def assert_within_and_maximal(result: plan_fit.Fit) -> None:
    proposed = result.proposal_args()
    assert estimate(proposed) <= result.budget  # plan's own figure, computed apart from the search
    batch = result.proposal.candidate.batch_size
    larger = [b for b in plan_fit.per_device_batches(4, 4) if b > batch]
    if larger:  # the next larger batch, same settings, does not fit
        assert estimate(with_(proposed, f"recipe.batch_size={min(larger)}", f"recipe.grad_accum={16 // min(larger)}")) > result.budget


def test_a_roomy_budget_takes_the_whole_step_in_one_micro_batch(overrides):
    result = fit(overrides, 1e12)
    assert result.proposal.candidate == plan_fit.Candidate(16, 1, False, "none")
    assert len(result.tried) == 1 and result.proposal_args()[-3:] == [
        "recipe.batch_size=16", "recipe.grad_accum=1", "hardware.gradient_checkpointing=false"]
    assert_within_and_maximal(result)
    assert result.device == "cuda" and fit(with_(overrides, "hardware=cpu"), 1e12).device == "cpu"  # the hardware group's device


def test_the_largest_batch_that_fits_keeps_the_effective_batch(overrides):
    four, eight = (estimate(with_(overrides, f"recipe.batch_size={b}", f"recipe.grad_accum={16 // b}")) for b in (4, 8))
    assert four < eight
    result = fit(overrides, (four + eight) / 2)
    c = result.proposal.candidate
    assert (c.batch_size, c.grad_accum, c.checkpointing, c.adapter) == (4, 4, False, "none")
    assert_within_and_maximal(result)
    assert not any(t.fits for t in result.tried if t.candidate.batch_size > 4)


def test_a_tight_budget_switches_on_gradient_checkpointing(overrides):
    # LoRA: its gradients are small, so the activations make the step's peak, and checkpointing lowers them.
    lora = with_(overrides, "adapter=lora")
    one = with_(lora, "recipe.batch_size=1", "recipe.grad_accum=16")
    without, with_checkpointing = estimate(one), estimate(with_(one, "hardware.gradient_checkpointing=true"))
    assert with_checkpointing < without
    result = fit(lora, (with_checkpointing + without) / 2)
    assert result.proposal.candidate.checkpointing and result.proposal.candidate.adapter == "lora"
    assert "hardware.gradient_checkpointing=true" in result.proposal_args() and result.adapter_change() is None
    assert_within_and_maximal(result)


def test_a_tighter_budget_takes_a_lighter_adapter_and_says_what_changes(overrides):
    smallest_full = estimate(with_(overrides, "recipe.batch_size=1", "recipe.grad_accum=16", "hardware.gradient_checkpointing=true"))
    result = fit(overrides, smallest_full - 1)
    assert result.proposal.candidate.adapter == "lora" and "adapter=lora" in result.proposal_args()
    assert "changes what trains" in result.adapter_change() and "lora parameters" in result.adapter_change()
    assert_within_and_maximal(result)
    assert plan_fit.record(result)["proposal"]["adapter_change"] == result.adapter_change()


def test_nothing_fits_names_the_smallest_need_as_a_valid_budget(overrides):
    result = fit(overrides, 1.0)
    assert result.proposal is None and not any(t.fits for t in result.tried)
    message = str(plan_fit.nothing_fits(result, "1"))
    smallest = min(t.peak for t in result.tried)
    suggested = message.split("give --fit ")[1].split()[0]
    assert plan_fit.parse_size(suggested) >= smallest and "recipe.batch_size=1 recipe.grad_accum=16" in message
    assert "\n" not in message


def test_the_data_is_encoded_once_per_search(overrides, monkeypatch):
    from alignctl.stages import sft

    calls = {"encode": 0, "read": 0}
    encode, read = sft.encode_split, plan_data._read

    def counted(name, function):
        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(sft, "encode_split", counted("encode", encode))
    monkeypatch.setattr(plan_data, "_read", counted("read", read))
    result = fit(overrides, 1.0)  # nothing fits: every setting is tried
    assert len(result.tried) >= 6 and calls == {"encode": 1, "read": 1}


@pytest.mark.parametrize("text, expected", [("80GiB", 80 * 2**30), ("80GB", 80e9), ("512MiB", 512 * 2**20), ("1.5TiB", 1.5 * 2**40),
                                            ("1073741824", 2**30), (" 2 gib ", 2 * 2**30)])
def test_memory_sizes(text, expected):
    assert plan_fit.parse_size(text) == expected


@pytest.mark.parametrize("text", ["80G", "lots", "-1GiB", "0", "", "1e9", "80 GiBs"])
def test_bad_memory_sizes_say_what_is_valid(text):
    with pytest.raises(UserError, match="not a memory size; give a number of bytes or one with a unit: 80GiB"):
        plan_fit.parse_size(text)


def test_fit_flag_forms():
    assert plan_fit.take_fit(["recipe=sft", "--fit", "8GiB", "--json"]) == ("8GiB", ["recipe=sft", "--json"])
    assert plan_fit.take_fit(["--fit=8GiB"]) == ("8GiB", [])
    assert plan_fit.take_fit(["recipe=sft"]) == (None, ["recipe=sft"])
    with pytest.raises(UserError, match="--fit needs a memory size"):
        plan_fit.take_fit(["--fit"])


def test_divisors_keep_the_step_and_adapters_get_lighter():
    assert plan_fit.per_device_batches(8, 2) == [16, 8, 4, 2, 1]
    assert plan_fit.per_device_batches(3, 2) == [6, 3, 2, 1]
    assert [a for a, _ in plan_fit.settings("none", with_qlora=True)] == ["none", "none", "lora", "lora", "qlora", "qlora"]
    assert plan_fit.settings("dora", with_qlora=False) == [("dora", False), ("dora", True), ("lora", False), ("lora", True)]
    assert plan_fit.settings("lora", with_qlora=True, checkpointing=True) == [("lora", True), ("qlora", True)]  # configured on: kept on
    assert plan_fit.budget_text(494.31 * 2**20) == "494.4MiB" and plan_fit.budget_text(2**30) == "1GiB"
