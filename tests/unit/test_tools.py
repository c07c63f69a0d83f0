"""alignctl.rl.tools: the calculator, tool-call markup, and tools that fail or hang coming back as messages."""

from __future__ import annotations

import time

import pytest

from alignctl.rl.tools import Tool, ToolCall, calculator, call_format, parse_tool_calls, run_tool


def test_the_calculator_is_exact_integer_arithmetic():
    assert calculator("347+89") == 436
    assert calculator(" (2**100 - 1) % 1000 ") == (2**100 - 1) % 1000
    assert calculator("-7 // 2 * 3") == -12
    assert calculator("123456789123456789 * 987654321987654321") == 123456789123456789 * 987654321987654321


def test_the_calculator_reads_zero_padded_numerals_as_the_builtin_task_writes_them():
    assert calculator("347+089") == 436 and calculator("000+000") == 0 and calculator("100+0") == 100 and calculator("2*(007)") == 14


@pytest.mark.parametrize("expression", ["1/2", "1.5+1", "__import__('os')", "x+1", "2**10000", "1+",
                                        # Exponents within the bound, values beyond it (one more **1000 would run for hours).
                                        "(10**1000)**1000", "(2**1000)**5 * (2**1000)**5 * 2"])
def test_the_calculator_refuses_what_is_not_integer_arithmetic(expression):
    with pytest.raises(ValueError):
        calculator(expression)


def test_the_markup_follows_the_chat_template():
    assert call_format("{% if tools %}<tool_call>{{ tools }}</tool_call>{% endif %}") == "hermes"
    assert call_format("{{ messages }}") == "plain" and call_format(None) == "plain"


def test_tool_calls_parse_in_either_markup():
    hermes = 'I will add. <tool_call>\n{"name": "calculator", "arguments": {"expression": "1+2"}}\n</tool_call>'
    assert parse_tool_calls(hermes, "hermes") == [ToolCall("calculator", {"expression": "1+2"})]
    assert parse_tool_calls("<tool_call>{not json}</tool_call>", "hermes") == [ToolCall("", "{not json}")]
    plain = "<tool>calculator: 3*4</tool> then <tool>lookup: {\"key\": \"a\"}</tool>"
    assert parse_tool_calls(plain, "plain") == [ToolCall("calculator", "3*4"), ToolCall("lookup", {"key": "a"})]
    assert parse_tool_calls("the answer is 12", "plain") == []


def test_hermes_arguments_written_as_a_json_string_are_decoded():
    """OpenAI-style: "arguments" holds a JSON string of the object, not the object."""
    openai_style = '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1+2\\"}"}</tool_call>'
    assert parse_tool_calls(openai_style, "hermes") == [ToolCall("calculator", {"expression": "1+2"})]
    raw_text = '<tool_call>{"name": "calculator", "arguments": "1+2"}</tool_call>'  # text for a one-parameter tool
    assert parse_tool_calls(raw_text, "hermes") == [ToolCall("calculator", "1+2")]


def slow(seconds: str) -> str:
    """Sleeps."""
    time.sleep(float(seconds))
    return "woke"


def two_args(a: int, b: int = 1) -> int:
    """Adds a and b."""
    return a + b


def exits(code: str) -> str:
    """Exits the process, or would."""
    raise SystemExit(int(code))


def test_a_failing_or_hanging_tool_is_a_message_to_the_model():
    tools = {t.name: t for t in (Tool(calculator), Tool(slow), Tool(two_args), Tool(exits))}
    assert run_tool(tools, ToolCall("exits", "3"), 5) == "error: exits raised SystemExit: 3"
    assert run_tool(tools, ToolCall("calculator", "6*7"), 5) == "42"
    assert run_tool(tools, ToolCall("calculator", "1//0"), 5) == "error: calculator raised ZeroDivisionError: integer division or modulo by zero"
    started = time.perf_counter()
    assert run_tool(tools, ToolCall("slow", "5"), 0.1) == "error: slow timed out after 0.1 seconds"
    assert time.perf_counter() - started < 2
    assert run_tool(tools, ToolCall("nope", "1"), 5).startswith("error: unknown tool 'nope'")
    assert run_tool(tools, ToolCall("", "{bad"), 5).startswith("error: cannot parse tool call")
    assert run_tool(tools, ToolCall("two_args", "1"), 5).startswith("error: two_args takes keyword arguments")
    assert run_tool(tools, ToolCall("two_args", {"a": 2, "c": 1}), 5).startswith("error: two_args raised TypeError")
    assert run_tool(tools, ToolCall("two_args", {"a": 2, "b": 3}), 5) == "5"


def test_a_tool_declares_itself_as_chat_templates_expect():
    schema = Tool(two_args).schema()
    assert schema == {"type": "function", "function": {"name": "two_args", "description": "Adds a and b.", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a"]}}}
