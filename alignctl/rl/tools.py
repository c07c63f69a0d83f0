"""Tools a model calls during a rollout: their declarations, the tool-call markup, and safe execution.

A tool is a plain Python function; `Tool` wraps it with the JSON schema that chat templates take as
``apply_chat_template(..., tools=[...])`` (the OpenAI function format, built from the signature and
docstring). A model asks for a tool in one of two markups:

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the format of the chat
  templates that declare tools (Qwen2.5, Hermes, SmolLM3: their template mentions ``<tool_call>``);
- ``plain``, for templates without one (and plain-text prompts): ``<tool>name: argument</tool>``, where
  the argument is a JSON object of keyword arguments, or else the text given to the tool's only parameter.

`run_tool` never raises: an unknown tool, bad arguments, an exception or a call that outlives its
timeout all come back as an ``error: ...`` message for the model to read.
"""

from __future__ import annotations

import ast
import inspect
import json
import operator
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
PLAIN_CALL = re.compile(r"<tool>\s*([A-Za-z_]\w*)\s*:?(.*?)</tool>", re.DOTALL)
JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] | str  # keyword arguments, or the raw text for a one-parameter tool


@dataclass(frozen=True)
class Tool:
    function: Callable[..., Any]

    @property
    def name(self) -> str:
        return self.function.__name__

    def parameters(self) -> list[str]:
        return [p.name for p in inspect.signature(self.function).parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def schema(self) -> dict:
        """The OpenAI-style declaration chat templates render (``tools=[...]``)."""
        signature = inspect.signature(self.function)
        properties = {name: {"type": JSON_TYPES.get(p.annotation if not isinstance(p.annotation, str) else builtin_type(p.annotation), "string")}
                      for name, p in signature.parameters.items() if name in self.parameters()}
        required = [name for name, p in signature.parameters.items() if name in properties and p.default is p.empty]
        description = inspect.getdoc(self.function) or self.name
        return {"type": "function", "function": {"name": self.name, "description": description.splitlines()[0],
                                                 "parameters": {"type": "object", "properties": properties, "required": required}}}


def builtin_type(annotation: str) -> type | None:
    """A string annotation (``from __future__ import annotations``) of a builtin type, else None."""
    return {t.__name__: t for t in JSON_TYPES}.get(annotation)


def call_format(chat_template: str | None) -> str:
    """``hermes`` where the tokenizer's chat template declares ``<tool_call>`` markup, else ``plain``."""
    return "hermes" if chat_template and "<tool_call>" in chat_template else "plain"


def keyword_arguments(arguments: Any) -> Any:
    """A hermes call's arguments as keyword arguments: OpenAI-style clients (and models trained on their
    transcripts) write them as a JSON string of an object, which is decoded; any other text stays the
    raw argument of a one-parameter tool."""
    if isinstance(arguments, str):
        try:
            decoded = json.loads(arguments)
        except ValueError:
            return arguments
        return decoded if isinstance(decoded, dict) else arguments
    return arguments


def parse_tool_calls(text: str, markup: str) -> list[ToolCall]:
    """Every tool call in a model's turn, in order; a malformed hermes call is kept (name "") so the
    model is told what was wrong with it."""
    if markup == "hermes":
        calls = []
        for body in HERMES_CALL.findall(text):
            try:
                payload = json.loads(body)
                calls.append(ToolCall(str(payload["name"]), keyword_arguments(payload.get("arguments") or {})))
            except (ValueError, KeyError, TypeError):
                calls.append(ToolCall("", body))
        return calls
    calls = []
    for name, argument in PLAIN_CALL.findall(text):
        argument = argument.strip()
        try:
            parsed = json.loads(argument)
        except ValueError:
            parsed = None
        calls.append(ToolCall(name, parsed if isinstance(parsed, dict) else argument))
    return calls


def run_tool(tools: dict[str, Tool], call: ToolCall, timeout: float | None) -> str:
    """The tool's result as text, or an ``error: ...`` message; never raises."""
    tool = tools.get(call.name)
    if tool is None:
        known = ", ".join(sorted(tools)) or "none"
        return f"error: unknown tool {call.name!r} (tools: {known})" if call.name else f"error: cannot parse tool call {call.arguments!r}"
    if isinstance(call.arguments, str):
        if len(tool.parameters()) != 1:
            return f"error: {tool.name} takes keyword arguments {tool.parameters()}, as a JSON object"
        arguments = {tool.parameters()[0]: call.arguments}
    else:
        arguments = call.arguments
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = str(tool.function(**arguments))
        except BaseException as err:  # the model's call went wrong (even sys.exit in a tool): it reads why
            outcome["error"] = f"error: {tool.name} raised {type(err).__name__}: {err}"

    # A daemon thread: Python cannot stop a hung call, but it is abandoned rather than holding the run.
    worker = threading.Thread(target=target, name=f"tool {tool.name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return f"error: {tool.name} timed out after {timeout:g} seconds"
    return outcome.get("error") or outcome["value"]


# ------------------------------------------------------------------------------------- calculator
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
             ast.Mod: operator.mod, ast.Pow: operator.pow}
MAX_EXPONENT = 1000  # keeps 9**9**9 from running for ever
# And a bound on every value: (10**1000)**1000 passes the exponent check, and one more **1000 would keep
# a core and gigabytes busy in the abandoned tool thread long after the model read "timed out".
MAX_BITS = 10_000  # about 3,000 digits, within what str() of an int may print (4,300)
# Zeros that pad a numeral (the built-in task writes 089): Python's grammar refuses them, a reader does not.
PADDING_ZEROS = re.compile(r"(?<![\w.])0+(?=\d)")


def _integer_value(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _integer_value(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = _integer_value(node.left), _integer_value(node.right)
        if isinstance(node.op, ast.Pow) and not 0 <= right <= MAX_EXPONENT:
            raise ValueError(f"exponent {right} outside [0, {MAX_EXPONENT}]")
        if isinstance(node.op, ast.Pow) and abs(left).bit_length() * right > MAX_BITS:  # before computing it
            raise ValueError(f"{ast.unparse(node)!r} has more than {MAX_BITS} bits")
        value = OPERATORS[type(node.op)](left, right)
        if value.bit_length() > MAX_BITS:  # operands within the bound: computing this was cheap
            raise ValueError(f"{ast.unparse(node)!r} has more than {MAX_BITS} bits")
        return value
    raise ValueError(f"not integer arithmetic: {ast.unparse(node)!r}")


def calculator(expression: str) -> int:
    """Exact integer arithmetic: + - * // % ** and parentheses, e.g. 347+89.

    Numerals may be zero-padded (347+089, as the built-in task writes its operands)."""
    try:
        tree = ast.parse(PADDING_ZEROS.sub("", expression.strip()), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression.strip()!r}") from None
    return _integer_value(tree.body)
