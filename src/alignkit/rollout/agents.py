"""Tools and environments for multi-turn, tool-using RL (see docs/agents.md).

A *tool* is a plain Python function with type hints and a Google-style docstring; the schema
the model sees is built from them by transformers' `get_json_schema` and rendered by the chat
template's `tools=` argument, as for any tool-calling model.

An *environment* is a class with

    reset(row: dict) -> list[dict]                 the opening messages of an episode
    step(assistant_message: dict) -> (new_messages, reward | None, done)

`row` is the prompt set's row: `prompt` (a message list) plus every other column.
`ToolEnv` is the environment behind `tools=`: its step parses the assistant's tool calls,
runs each tool under a timeout and answers with one `tool` message per call (the result, or
the error as text); a turn without a tool call ends the episode.

Tool-call format (`tool_parser`): `hermes` (default) reads Hermes/Qwen-style
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks; any other value is a regular
expression whose matches are calls, with named groups `name` and (optionally) `arguments`
(a JSON object).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from alignkit.errors import UserError
from alignkit.toy.tokenizer import NAMED_TEMPLATES as BUILTIN_TEMPLATES  # chat_template=toy-tools

__all__ = ["Tool", "ToolCall", "ToolEnv", "Agent", "load_object", "load_tools", "load_env", "parse_tool_calls",
           "run_tool", "template_supports_tools", "build_agent", "BUILTIN_TEMPLATES", "resolve_chat_template",
           "with_tools"]

HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def resolve_chat_template(name: str | None) -> str | None:
    """A built-in template's text for its name (`toy-tools`), else `name` unchanged."""
    return BUILTIN_TEMPLATES.get(name, name) if name else name


def template_supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template reads a `tools` variable (as tool-calling templates do)."""
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("tool_use") or t.get("default")
    return bool(t) and re.search(r"\btools\b", t) is not None


# --------------------------------------------------------------------------- loading


def load_object(spec: str, key: str):
    """The object named by `module:name` or `path/to/file.py:name`; UserError (naming config key
    `key`) when it cannot be imported or does not exist."""
    target, sep, name = spec.strip().rpartition(":")
    if not sep or not target or not name:
        raise UserError(f"{key}='{spec}': expected module:name or path/to/file.py:name")
    try:
        if target.endswith(".py") or "/" in target:
            path = Path(os.path.expanduser(target))
            if not path.is_file():
                raise UserError(f"{key}='{spec}': file {target} not found; check the path")
            mod_name = f"_alignkit_{key}_{path.stem}_{abs(hash(str(path.resolve())))}"
            mod = sys.modules.get(mod_name)
            if mod is None:
                s = importlib.util.spec_from_file_location(mod_name, path)
                mod = importlib.util.module_from_spec(s)
                s.loader.exec_module(mod)
                sys.modules[mod_name] = mod
        else:
            added = os.getcwd() not in sys.path
            if added:
                sys.path.insert(0, os.getcwd())
            try:
                mod = importlib.import_module(target)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
    except UserError:
        raise
    except ModuleNotFoundError as e:
        raise UserError(f"{key}='{spec}': cannot import {target} ({e}); make it importable (PYTHONPATH) or give "
                        f"a file: path/to/file.py:{name}") from None
    except Exception as e:
        raise UserError(f"{key}='{spec}': importing {target} raised {type(e).__name__}: {e}") from None
    obj = getattr(mod, name, None)
    if obj is None:
        raise UserError(f"{key}='{spec}': {target} has no '{name}'")
    return obj


@dataclass
class Tool:
    """A callable the model may call: `fn` and its JSON schema (`get_json_schema(fn)`)."""

    name: str
    fn: Callable
    schema: dict


def make_tool(fn: Callable, spec: str | None = None) -> Tool:
    """The `Tool` of a function; UserError when its schema cannot be built (no docstring, an
    argument without a type hint or without a description in the docstring's Args)."""
    from transformers.utils import get_json_schema

    if not callable(fn) or inspect.isclass(fn):
        raise UserError(f"tools: '{spec or fn}' is not a function")
    try:
        schema = get_json_schema(fn)
    except Exception as e:
        raise UserError(f"tools: '{spec or fn.__name__}': {e} Give the function type hints for every argument and "
                        "a docstring with a description and an Args: section (see docs/agents.md)") from None
    return Tool(schema["function"]["name"], fn, schema)


def load_tools(specs) -> list[Tool]:
    """Tools from `module:function` specs (a list, or one comma-separated string)."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    tools = [make_tool(load_object(s, "tools"), s) for s in specs or []]
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise UserError(f"tools: two tools share a name ({', '.join(names)}); rename one")
    return tools


def load_env(spec: str):
    """The environment class named by `spec`; UserError when it lacks `reset` or `step`."""
    cls = load_object(spec, "env")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise UserError(f"env='{spec}': {getattr(cls, '__name__', cls)} has no {' or '.join(missing)} method; an "
                        "environment needs reset(row) -> messages and step(assistant_message) -> "
                        "(new_messages, reward | None, done)")
    return cls


# --------------------------------------------------------------------------- calls


@dataclass
class ToolCall:
    """One parsed call: the tool's name and arguments, or `error` when the call was malformed."""

    name: str | None
    arguments: dict
    error: str | None = None


def parse_tool_calls(text: str, parser: str = "hermes") -> list[ToolCall]:
    """The tool calls in an assistant's text, in order. `parser`: "hermes" or a regex with named
    groups `name` and optionally `arguments` (JSON). A block that is not valid JSON, lacks a name
    or has non-object arguments gives a `ToolCall` with `error` set (a malformed call); an opening
    `<tool_call>` never closed counts as one too (hermes)."""
    calls: list[ToolCall] = []
    if parser == "hermes":
        for body in HERMES.findall(text):
            try:
                obj = json.loads(body)
            except json.JSONDecodeError as e:
                calls.append(ToolCall(None, {}, f"malformed tool call (not JSON: {e.msg})"))
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                calls.append(ToolCall(None, {}, 'malformed tool call (expected {"name": ..., "arguments": {...}})'))
                continue
            calls.append(_with_args(obj["name"], obj.get("arguments", {})))
        if text.count("<tool_call>") > text.count("</tool_call>"):
            calls.append(ToolCall(None, {}, "malformed tool call (<tool_call> without </tool_call>)"))
        return calls
    for m in re.finditer(parser, text, re.DOTALL):
        g = m.groupdict()
        calls.append(_with_args(g.get("name"), g.get("arguments") or {}))
    return calls


def _with_args(name, args) -> ToolCall:
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            return ToolCall(name, {}, f"malformed arguments for {name} (not JSON: {e.msg})")
    if not isinstance(args, dict):
        return ToolCall(name, {}, f"malformed arguments for {name} (expected a JSON object)")
    return ToolCall(name, args)


def run_tool(tools: dict[str, Tool], call: ToolCall, timeout: float) -> tuple[str, bool]:
    """(text for the `tool` message, whether it is an error) of one call. The tool runs in a daemon
    thread for at most `timeout` seconds (a thread cannot be killed: one that overruns finishes in
    the background, its result dropped). Strings, numbers, booleans and JSON-serialisable lists
    and dicts are results; an exception, a timeout, an unknown tool, bad arguments or another
    return type give an `Error: ...` text."""
    if call.error:
        return f"Error: {call.error}", True
    tool = tools.get(call.name)
    if tool is None:
        return f"Error: unknown tool '{call.name}' (available: {', '.join(tools)})", True
    box: dict = {}

    def target():
        try:
            box["out"] = tool.fn(**call.arguments)
        except BaseException as e:  # reported to the model, not raised
            box["err"] = e

    t = threading.Thread(target=target, name=f"alignkit-tool-{tool.name}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return f"Error: {tool.name} timed out after {timeout:g} s", True
    if "err" in box:
        e = box["err"]
        return f"Error: {tool.name} raised {type(e).__name__}: {' '.join(str(e).split())[:300]}", True
    out = box.get("out")
    if isinstance(out, bool) or isinstance(out, (int, str)):
        return str(out), False
    if isinstance(out, float):
        return (str(int(out)) if out.is_integer() else repr(out)), False
    if isinstance(out, (list, dict)):
        try:
            return json.dumps(out, ensure_ascii=False), False
        except (TypeError, ValueError):
            pass
    return f"Error: {tool.name} returned {type(out).__name__}, not text, a number or JSON", True


@dataclass
class ToolEnv:
    """The environment of `tools=`: the prompt's messages, then one `tool` message per call."""

    tools: dict[str, Tool]
    parser: str = "hermes"
    timeout: float = 5.0
    stats: dict = field(default_factory=lambda: {"tool_calls": 0, "tool_errors": 0, "malformed_calls": 0})

    def reset(self, row: dict) -> list[dict]:
        """The row's prompt messages (copied)."""
        return [dict(m) for m in row["prompt"]]

    def step(self, assistant_message: dict):
        """([one `tool` message per call], None, False), or ([], None, True) for a turn without a
        call; counts calls, errors and malformed calls in `stats`."""
        calls = parse_tool_calls(assistant_message["content"], self.parser)
        if not calls:
            return [], None, True
        out = []
        for c in calls:
            text, err = run_tool(self.tools, c, self.timeout)
            self.stats["tool_calls"] += 1
            self.stats["tool_errors"] += int(err)
            self.stats["malformed_calls"] += int(c.error is not None)
            out.append({"role": "tool", "name": c.name or "invalid", "content": text})
        return out, None, False


@dataclass
class Agent:
    """How episodes are run: a factory of environments (one per episode), the tool schemas the
    template renders (None without tools) and the turn limit."""

    make_env: Callable[[], Any]
    schemas: list[dict] | None
    max_turns: int


def build_agent(cfg, tokenizer) -> Agent | None:
    """The agent a config asks for (`tools=` and/or `env=`), or None for single-turn runs.
    UserError: an import that fails, a tool without a schema, an environment without reset/step,
    tools with a chat template that has no tool support."""
    tools_spec, env_spec = getattr(cfg, "tools", None), getattr(cfg, "env", None)
    if not tools_spec and not env_spec:
        return None
    tools = load_tools(tools_spec) if tools_spec else []
    if tools and not template_supports_tools(tokenizer):
        raise UserError("tools=: the chat template of this tokenizer has no tool support (it never reads `tools`); "
                        "set chat_template= to a tool-calling template (chat_template=toy-tools for the toy model)")
    schemas = [t.schema for t in tools] or None
    if env_spec:
        cls = load_env(env_spec)

        def make_env():
            try:
                return cls()
            except TypeError as e:
                raise UserError(f"env='{env_spec}': {cls.__name__}() cannot be built without arguments ({e})") \
                    from None
    else:
        by_name = {t.name: t for t in tools}

        def make_env():
            return ToolEnv(by_name, cfg.tool_parser, cfg.tool_timeout)
    if env_spec:
        make_env()  # fail now, not in the middle of a run
    return Agent(make_env, schemas, cfg.max_turns)


class _ToolsTokenizer:
    """A tokenizer whose chat template always receives `tools` (SFT rows with a `tools` column)."""

    def __init__(self, tokenizer, tools: list[dict]):
        self._tok, self._tools = tokenizer, tools

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def apply_chat_template(self, messages, **kwargs):
        kwargs.setdefault("tools", self._tools)
        return self._tok.apply_chat_template(messages, **kwargs)


def with_tools(tokenizer, tools, where: str = "row"):
    """`tokenizer` rendering every conversation with `tools` (a list of JSON schemas, or its JSON
    text, as in a `tools` column); the tokenizer itself when `tools` is empty. UserError for a value
    that is not a list of schemas, or a template without tool support."""
    if tools is None or tools == "" or tools == []:
        return tokenizer
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: 'tools' is not JSON ({e.msg}); give a list of tool schemas") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise UserError(f"{where}: 'tools' must be a list of tool schemas (JSON objects)")
    if not template_supports_tools(tokenizer):
        raise UserError(f"{where}: the row has 'tools' but the chat template has no tool support; set "
                        "chat_template= to a tool-calling template (chat_template=toy-tools for the toy model)")
    return _ToolsTokenizer(tokenizer, tools)
