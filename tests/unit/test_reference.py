"""Reference-mode resolution and the tokenizer check, without models."""

import pytest

from alignctl.config.schema import Reference
from alignctl.core.errors import ConfigError
from alignctl.models.tokenizer import build_char_tokenizer
from alignctl.train.reference import check_same_tokenizer, resolve_mode


@pytest.mark.parametrize(
    ("mode", "adapter", "reference_free", "own", "expected"),
    [
        (Reference.auto, "lora", False, False, Reference.adapter_disabled),
        (Reference.auto, "none", False, False, Reference.separate),
        (Reference.auto, "lora", True, False, Reference.none),
        (Reference.auto, "lora", False, True, Reference.separate),  # another model is the reference: hold it
        (Reference.precomputed, "none", False, False, Reference.precomputed),
    ],
)
def test_auto_and_explicit_modes(mode, adapter, reference_free, own, expected):
    assert resolve_mode(mode, adapter, reference_free, own) == expected


def test_adapter_disabled_needs_an_adapter_and_the_starting_policy():
    with pytest.raises(ConfigError, match="needs an adapter"):
        resolve_mode(Reference.adapter_disabled, "none", False)
    with pytest.raises(ConfigError, match="inputs.reference"):
        resolve_mode(Reference.adapter_disabled, "lora", False, own_reference=True)


def test_a_reference_with_another_tokenizer_is_refused():
    policy = build_char_tokenizer()
    check_same_tokenizer(policy, build_char_tokenizer(), "same")  # identical: accepted
    other = build_char_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ConfigError, match="different tokenizer"):
        check_same_tokenizer(policy, other, "runs/other")
