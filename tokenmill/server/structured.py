"""A request's output constraint: from whichever field set it to checked engine parameters.

Clients ask for structured output in several spellings, and at most one may be used
per request:

- OpenAI's ``response_format`` (``json_object``, ``json_schema``; ``text`` is none);
- vLLM's ``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``,
  ``json_object``) and its older ``guided_json`` / ``guided_regex`` /
  ``guided_choice`` / ``guided_grammar`` fields;
- ``tool_choice`` ``required`` or a named function (the tools' parameter schemas).

:func:`resolve_constraint` picks the one given (400 if several); :func:`check_constraint`
compiles it to a grammar off the event loop so that an invalid schema, regex or EBNF,
or a schema feature the grammar cannot enforce, is a 400 naming the exact parameter
before the request is queued - never silently ignored.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from tokenmill.sampling.params import InvalidParameterError, StructuredOutputsParams
from tokenmill.server.chat_output import ToolPlan
from tokenmill.server.errors import invalid_param


@dataclass
class Constraint:
    """The request's constraint and the parameter that set it (named in errors)."""

    params: StructuredOutputsParams
    param: str
    # Errors about one of the checked schemas name this parameter instead (tools[i]...).
    parts: list[tuple[StructuredOutputsParams, str]] | None = None


def resolve_constraint(req: Any, plan: ToolPlan | None = None) -> Constraint | None:
    """The one constraint ``req`` asks for, or None (400 if it asks for several)."""
    found: list[Constraint] = []
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        found.append(_make("response_format", json_object=True))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise invalid_param("response_format of type json_schema needs "
                                "json_schema.schema.", "response_format.json_schema.schema")
        found.append(_make("response_format.json_schema.schema", json=fmt.json_schema.schema_))
    so = getattr(req, "structured_outputs", None)
    if so is not None:
        given = {"json": so.json_, "regex": so.regex, "choice": so.choice,
                 "grammar": so.grammar,
                 "json_object": so.json_object if so.json_object else None}
        names = [k for k, v in given.items() if v is not None]
        if len(names) != 1:
            raise invalid_param("structured_outputs must set exactly one of json, regex, "
                                "choice, grammar or json_object.", "structured_outputs")
        found.append(_make(f"structured_outputs.{names[0]}", **{names[0]: given[names[0]]},
                           disable_any_whitespace=so.disable_any_whitespace))
    if getattr(req, "guided_whitespace_pattern", None) is not None:
        raise invalid_param("guided_whitespace_pattern is not supported; use "
                            "structured_outputs.disable_any_whitespace for compact JSON.",
                            "guided_whitespace_pattern")
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                      ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        value = getattr(req, name, None)
        if value is not None:
            found.append(_make(name, **{key: value}))
    if plan is not None and plan.enforced:
        schema = plan.grammar_schema()
        assert schema is not None
        constraint = _make("tool_choice", json=schema)
        # Each tool's parameters are checked on their own, so errors name the tool.
        constraint.parts = [
            (_make(f"tools[{i}].function.parameters", json=t["function"]["parameters"]).params,
             f"tools[{i}].function.parameters")
            for i, t in enumerate(plan.tools)
            if t["function"].get("parameters") and (plan.mode == "required"
                                                    or t["function"]["name"] == plan.named)]
        found.append(constraint)
    if len(found) > 1:
        raise invalid_param(
            f"Only one way of constraining the output may be used per request; got "
            f"{found[0].param.split('.')[0]} and {found[1].param.split('.')[0]}.",
            found[1].param.split(".")[0])
    return found[0] if found else None


def _make(param: str, **fields: Any) -> Constraint:
    try:
        return Constraint(StructuredOutputsParams(**fields), param)
    except InvalidParameterError as exc:
        raise invalid_param(f"{param} {exc.message}", param) from None


def check_constraint(constraint: Constraint) -> None:
    """Compile the constraint's grammar(s) without a vocabulary (blocking)."""
    from tokenmill.sampling.grammar import check_structured_outputs

    for params, param in (constraint.parts or []) + [(constraint.params, constraint.param)]:
        try:
            check_structured_outputs(params)
        except InvalidParameterError as exc:
            raise invalid_param(f"{param} {exc.message}", param) from None
        except ImportError as exc:
            raise invalid_param(f"Structured outputs are not available on this server: {exc}",
                                param) from None


async def check_constraint_async(constraint: Constraint) -> None:
    """:func:`check_constraint` in a worker thread (big schemas take a while)."""
    await asyncio.get_running_loop().run_in_executor(None, check_constraint, constraint)
