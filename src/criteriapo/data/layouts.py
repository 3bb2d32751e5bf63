"""Other tools' dataset layouts, recognised and converted on read into the rows
:mod:`criteriapo.data.formats` parses (TRL's vocabulary):

- LLaMA-Factory ``sharegpt``: ``conversations`` (or ``messages``) of ``{"from", "value"}`` turns
  (human, gpt, system, observation, function_call), an optional ``system``; with ``chosen`` and
  ``rejected`` single turns a preference pair, with ``kto_tag`` a KTO example, else SFT.
- LLaMA-Factory ``alpaca``: ``instruction`` (+ ``input``), ``output``, optional ``system`` and
  ``history`` ([[question, answer], ...]); with ``chosen`` / ``rejected`` (or a two-item
  ``output``) a preference pair, with ``kto_tag`` a KTO example, else SFT.
- Anthropic HH-RLHF: ``chosen`` / ``rejected`` texts of ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``
  turns; the turns before the last reply are the prompt.
- OpenAI preference fine-tuning: ``input.messages``, ``preferred_output``, ``non_preferred_output``.

UltraFeedback (raw and binarized) and OpenAI chat JSONL (``messages``) are read as they are.
A converter raises :class:`RowProblem` naming the field of the original layout."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from criteriapo.data.records import RowProblem

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "tool",
    "function_call": "assistant",
}


@dataclass(frozen=True)
class Layout:
    name: str
    matches: Callable[[dict[str, Any]], bool]
    convert: Callable[[dict[str, Any]], dict[str, Any]]


def _turns(row: dict[str, Any]) -> tuple[str, list]:
    key = "conversations" if "conversations" in row else "messages"
    return key, row[key]


def _is_sharegpt(row: dict[str, Any]) -> bool:
    key = "conversations" if "conversations" in row else "messages" if "messages" in row else None
    turns = row.get(key) if key else None
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]


def _sharegpt_turn(turn: Any, field: str) -> dict[str, str]:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise RowProblem(field, 'expected a turn {"from": ..., "value": ...}')
    role = SHAREGPT_ROLES.get(turn["from"])
    if role is None:
        raise RowProblem(
            f"{field}.from", f"unknown speaker {turn['from']!r}; expected one of {', '.join(SHAREGPT_ROLES)}"
        )
    if not isinstance(turn["value"], str):
        raise RowProblem(f"{field}.value", f"expected a string, got {type(turn['value']).__name__}")
    return {"role": role, "content": turn["value"]}


def _with_system(row: dict[str, Any], messages: list[dict[str, str]]) -> list[dict[str, str]]:
    system = row.get("system")
    if system is None or system == "":
        return messages
    if not isinstance(system, str):
        raise RowProblem("system", f"expected a string, got {type(system).__name__}")
    return [{"role": "system", "content": system}, *messages]


def _sharegpt(row: dict[str, Any]) -> dict[str, Any]:
    key, turns = _turns(row)
    messages = _with_system(row, [_sharegpt_turn(t, f"{key}[{i}]") for i, t in enumerate(turns)])
    if "chosen" in row or "rejected" in row:
        reply = {s: [_sharegpt_turn(_one_turn(row.get(s), s), s)] for s in ("chosen", "rejected")}
        return {"prompt": messages, **reply}
    if "kto_tag" in row:
        if not messages or messages[-1]["role"] != "assistant":
            raise RowProblem(key, "a KTO example ends with the assistant's reply (from: gpt)")
        return {"prompt": messages[:-1], "completion": messages[-1:], "label": row["kto_tag"]}
    return {"messages": messages}


def _one_turn(value: Any, field: str) -> Any:
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    if value is None:
        raise RowProblem(field, "missing")
    return value


def _is_alpaca(row: dict[str, Any]) -> bool:
    return "instruction" in row and "completions" not in row and ("output" in row or "chosen" in row)


def _text(row: dict[str, Any], field: str, required: bool = True) -> str:
    value = row.get(field)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "nothing" if value is None else type(value).__name__
        raise RowProblem(field, f"expected a string, got {got}")
    return value


def _alpaca(row: dict[str, Any]) -> dict[str, Any]:
    question = _text(row, "instruction")
    extra = _text(row, "input", required=False)
    messages: list[dict[str, str]] = []
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowProblem("history", "expected a list of [question, answer] pairs")
    for i, turn in enumerate(history):
        if not (isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise RowProblem(f"history[{i}]", "expected a [question, answer] pair of strings")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages = _with_system(
        row, [*messages, {"role": "user", "content": f"{question}\n{extra}" if extra else question}]
    )
    output = row.get("output")
    if "chosen" in row or (isinstance(output, list) and len(output) == 2):
        chosen, rejected = (row.get("chosen"), row.get("rejected")) if "chosen" in row else output
        pair = {"chosen": chosen, "rejected": rejected}
        for side, text in pair.items():
            if not isinstance(text, str):
                raise RowProblem(side, f"expected a string, got {type(text).__name__}")
        return {"prompt": messages, **{s: [{"role": "assistant", "content": t}] for s, t in pair.items()}}
    completion = [{"role": "assistant", "content": _text(row, "output")}]
    if "kto_tag" in row:
        return {"prompt": messages, "completion": completion, "label": row["kto_tag"]}
    return {"prompt": messages, "completion": completion}


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _is_hh(row: dict[str, Any]) -> bool:
    chosen = row.get("chosen")
    return isinstance(chosen, str) and chosen.startswith("\n\nHuman: ") and "\n\nAssistant:" in chosen


def _hh_turns(text: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(text, str) or not text.startswith("\n\nHuman: "):
        raise RowProblem(field, 'expected a text of "\\n\\nHuman: ..." and "\\n\\nAssistant: ..." turns')
    parts = HH_TURN.split(text)[1:]  # speaker, words, speaker, words, ...
    turns = [
        {"role": "user" if who == "Human" else "assistant", "content": words.strip()}
        for who, words in zip(parts[::2], parts[1::2], strict=True)
    ]
    if turns[-1]["role"] != "assistant":
        raise RowProblem(field, "the last turn is not the assistant's: there is no reply to prefer")
    return turns


def _hh(row: dict[str, Any]) -> dict[str, Any]:
    chosen, rejected = _hh_turns(row.get("chosen"), "chosen"), _hh_turns(row.get("rejected"), "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise RowProblem("rejected", "its turns before the last reply differ from chosen's: not one prompt")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _is_openai_preference(row: dict[str, Any]) -> bool:
    return "preferred_output" in row and "input" in row


def _openai_preference(row: dict[str, Any]) -> dict[str, Any]:
    given = row.get("input")
    if not isinstance(given, dict) or "messages" not in given:
        raise RowProblem("input", 'expected {"messages": [...]}')
    return {
        "prompt": given["messages"],
        "chosen": row.get("preferred_output"),
        "rejected": row.get("non_preferred_output"),
    }


LAYOUTS = [
    Layout("LLaMA-Factory sharegpt", _is_sharegpt, _sharegpt),
    Layout("LLaMA-Factory alpaca", _is_alpaca, _alpaca),
    Layout("Anthropic HH-RLHF", _is_hh, _hh),
    Layout("OpenAI preference fine-tuning", _is_openai_preference, _openai_preference),
]


def detect_layout(values: Sequence[dict[str, Any]]) -> Layout | None:
    """The layout most of the rows are in, when they are in one of :data:`LAYOUTS`."""
    votes = Counter(next((lay.name for lay in LAYOUTS if lay.matches(v)), None) for v in values)
    name, n = votes.most_common(1)[0] if votes else (None, 0)
    if name is None or n * 2 < len(values):
        return None
    return next(lay for lay in LAYOUTS if lay.name == name)
