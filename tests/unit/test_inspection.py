"""Chat-template warnings of `alignctl data inspect` (alignctl/data/inspection.py) on hand-made templates."""

from __future__ import annotations

import pytest

from alignctl.data.inspection import injected_system_text, spans, template_warnings
from alignctl.models.tokenizer import build_char_tokenizer

TURNS = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
DEFAULT_SYSTEM = "{% if messages[0]['role'] != 'system' %}<|system|>You are a helpful bot.<|end|>{% endif %}" + TURNS
# Counts the turns first: a longer conversation renders a different start, so turns cannot be told apart.
NOT_PREFIX = "{{ messages | length }}" + TURNS


@pytest.fixture
def tokenizer():
    return build_char_tokenizer()


def test_a_plain_template_draws_no_warning(tokenizer):
    tokenizer.chat_template = TURNS
    assert template_warnings(tokenizer, conversational=True, completion_only=True) == []


def test_a_default_system_prompt_is_found(tokenizer):
    tokenizer.chat_template = DEFAULT_SYSTEM
    assert "You are a helpful bot." in injected_system_text(tokenizer)
    (warning,) = template_warnings(tokenizer, conversational=True, completion_only=True)
    assert "default system prompt" in warning and "helpful bot" in warning


def test_a_template_that_cannot_mark_assistant_turns(tokenizer):
    tokenizer.chat_template = NOT_PREFIX
    (warning,) = template_warnings(tokenizer, conversational=True, completion_only=True)
    assert "cannot mark assistant turns" in warning
    # Without assistant-only loss every token trains: the mask is not needed.
    assert template_warnings(tokenizer, conversational=True, completion_only=False) == []


def test_standard_rows_need_no_template(tokenizer):
    tokenizer.chat_template = None
    assert template_warnings(tokenizer, conversational=False, completion_only=True) == []
    assert "no chat template" in template_warnings(tokenizer, conversational=True, completion_only=True)[0]


def test_spans_follow_the_labels(tokenizer):
    ids = tokenizer("12+3=15", add_special_tokens=False)["input_ids"]
    labels = [-100] * 5 + ids[5:]
    assert [(s.text, s.trained) for s in spans(tokenizer, ids, labels)] == [("12+3=", False), ("15", True)]
