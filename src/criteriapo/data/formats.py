"""Turn raw rows into typed examples, with a precise reason for every row that cannot be used.

Formats (TRL's vocabulary):
- preference: ``prompt``/``chosen``/``rejected``, standard (strings) or conversational (message
  lists), explicit prompt or implicit (the shared beginning of chosen and rejected). Optional
  per-criterion fields: ``criterion`` (+ ``weight``) or ``criteria_labels`` ({name: verdict}).
- sft: ``messages``, ``prompt``/``completion``, or ``text``.
- multi_criteria: UltraFeedback-style ``instruction`` (or ``prompt``) with ``completions``, each a
  ``response`` rated per aspect under ``ratings`` or ``annotations``.
- unpaired: ``prompt``/``completion``/``label`` (KTO's); a preference pair is read as two such rows.
"""

from __future__ import annotations

import math
import os
from enum import StrEnum
from typing import Any

from criteriapo.data.records import (
    Message,
    MultiCriteriaExample,
    PreferenceExample,
    RatedCompletion,
    RowProblem,
    RowRef,
    SFTExample,
    Text,
    UnpairedExample,
)


class DataKind(StrEnum):
    """What a dataset's rows hold. A member is its name as a string (``DataKind.SFT == "sft"``), so
    configs, command-line arguments and JSON keep the plain names."""

    PREFERENCE = "preference"
    SFT = "sft"
    MULTI_CRITERIA = "multi_criteria"
    UNPAIRED = "unpaired"


ROLES = ("system", "user", "assistant", "tool")
PROMPT_END_ROLES = ("user", "tool")
EXPECTED_FIELDS = {
    DataKind.PREFERENCE: "prompt (optional), chosen, rejected",
    DataKind.SFT: "messages, or prompt and completion, or text",
    DataKind.MULTI_CRITERIA: "instruction (or prompt) and completions",
    DataKind.UNPAIRED: "prompt, completion and label (true or false), or a preference pair",
}


def detect_kind(row: dict[str, Any]) -> DataKind | None:
    """The format a row looks like, from its field names alone."""
    if "completions" in row and ("instruction" in row or "prompt" in row):
        return DataKind.MULTI_CRITERIA
    if "chosen" in row or "rejected" in row:
        return DataKind.PREFERENCE
    if "label" in row and "completion" in row:
        return DataKind.UNPAIRED
    if "messages" in row or "completion" in row or "text" in row:
        return DataKind.SFT
    return None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require(row: dict[str, Any], field: str) -> Any:
    if field not in row or row[field] is None:
        raise RowProblem(field, "missing")
    return row[field]


def _string(value: Any, field: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RowProblem(field, f"expected a string, got {_type_name(value)}")
    _encodable(value, field)
    if not allow_empty and not value.strip():
        raise RowProblem(field, "empty")
    return value


def _encodable(value: str, field: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from a "\ud800" escape in JSON
        raise RowProblem(field, "contains an unpaired surrogate (not valid Unicode text)") from None
    if (at := value.find("\x00")) >= 0:  # no text has one: a binary or corrupted file
        raise RowProblem(field, f"contains a NUL character (at character {at}); remove it")


def _check_turns(messages: list[Message], field: str) -> list[Message]:
    """A system message only first, and no two user messages in a row: chat templates place the
    system message before the conversation, and many refuse turns that do not alternate."""
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise RowProblem(
                f"{field}[{i}].role", "a system message must come first; move it to the start or merge it"
            )
        if i and m["role"] == "user" and messages[i - 1]["role"] == "user":
            raise RowProblem(
                f"{field}[{i}].role",
                f"two user messages in a row ({field}[{i - 1}] and [{i}]): merge them into one",
            )
    return messages


def _messages(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list):
        raise RowProblem(field, f"expected a list of {{role, content}} messages, got {_type_name(value)}")
    if not value:
        raise RowProblem(field, "empty list of messages")
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RowProblem(where, f"expected a message object with role and content, got {_type_name(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise RowProblem(f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise RowProblem(f"{where}.content", f"expected a string, got {_type_name(content)}")
        _encodable(content, f"{where}.content")
        out.append(dict(m))
    return out


def _completion_messages(messages: list[Message], field: str) -> list[Message]:
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            raise RowProblem(
                f"{field}[{i}].role", f"a completion must be assistant messages, got {m['role']!r}"
            )
    if not any(m["content"].strip() for m in messages):
        raise RowProblem(field, "empty completion")
    return messages


def _check_prompt_messages(prompt: list[Message], field: str) -> list[Message]:
    _check_turns(prompt, field)
    last = prompt[-1]["role"]
    if last not in PROMPT_END_ROLES:
        raise RowProblem(
            f"{field}[{len(prompt) - 1}].role",
            f"a prompt must end with a user (or tool) message, got {last!r}",
        )
    return prompt


def _split_shared_messages(chosen: list[Message], rejected: list[Message]) -> tuple[list, list, list]:
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == 0:
        raise RowProblem(
            "chosen",
            "chosen and rejected share no leading messages, so the prompt cannot be "
            "inferred; add a prompt field",
        )
    if k == len(chosen) or k == len(rejected):
        which = "chosen" if k == len(chosen) else "rejected"
        raise RowProblem(which, f"{which} has no messages after the part it shares with the other response")
    return chosen[:k], chosen[k:], rejected[k:]


def split_shared_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Implicit prompt of two strings: their shared beginning, cut back to a whitespace boundary
    so no word is split between prompt and completion (the whitespace goes to the completion)."""
    cut = len(os.path.commonprefix([chosen, rejected]))

    def word_goes_on(i: int) -> bool:
        return any(i < len(s) and not s[i].isspace() for s in (chosen, rejected))

    if cut > 0 and not chosen[cut - 1].isspace() and word_goes_on(cut):
        while cut > 0 and not chosen[cut - 1].isspace():
            cut -= 1
    while cut > 0 and chosen[cut - 1].isspace():
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _verdict(value: Any, field: str) -> int:
    names = {"chosen": 1, "rejected": -1, "tie": 0}
    if isinstance(value, str) and value.lower() in names:
        return names[value.lower()]
    if isinstance(value, int | float) and not isinstance(value, bool) and value in (1, -1, 0):
        return int(value)
    raise RowProblem(field, f"expected 'chosen', 'rejected', 'tie' (or 1, -1, 0), got {value!r}")


def _criterion_fields(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if row.get("criterion") is not None:
        out["criterion"] = _string(row["criterion"], "criterion")
    if row.get("weight") is not None:
        w = _number(row["weight"], "weight")
        if w is None or w < 0:
            raise RowProblem("weight", f"expected a number >= 0, got {row['weight']!r}")
        out["weight"] = w
    labels = row.get("criteria_labels")
    if labels is not None:
        if not isinstance(labels, dict) or not labels:
            raise RowProblem(
                "criteria_labels",
                f"expected a non-empty object {{criterion: verdict}}, got {_type_name(labels)}",
            )
        out["criteria_labels"] = {
            _string(k, "criteria_labels"): _verdict(v, f"criteria_labels.{k}") for k, v in labels.items()
        }
    return out


def _distinct(chosen: Text, rejected: Text) -> None:
    if chosen == rejected:
        raise RowProblem("rejected", "identical to chosen: the pair carries no preference")


def parse_preference(row: dict[str, Any]) -> dict[str, Any]:
    """Fields of a :class:`PreferenceExample` (without ``source``) from one row."""
    chosen, rejected, prompt = _require(row, "chosen"), _require(row, "rejected"), row.get("prompt")
    implicit = False
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise RowProblem(
            "rejected",
            f"chosen is {_kind_of(chosen)} but rejected is {_kind_of(rejected)}; "
            "both must be strings or both message lists",
        )
    if isinstance(chosen, list):
        chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        _distinct(chosen, rejected)
        if prompt is None or (isinstance(prompt, str) and chosen[0]["role"] != "assistant"):
            # implicit prompt; a string prompt beside full conversations (UltraFeedback) is a duplicate
            prompt, chosen, rejected = _split_shared_messages(chosen, rejected)
            implicit = True
            prompt = _check_prompt_messages(prompt, "chosen")
        elif isinstance(prompt, str):
            prompt = [{"role": "user", "content": _string(prompt, "prompt")}]
        else:
            prompt = _check_prompt_messages(_messages(prompt, "prompt"), "prompt")
        chosen = _completion_messages(chosen, "chosen")
        rejected = _completion_messages(rejected, "rejected")
    else:
        chosen, rejected = _string(chosen, "chosen"), _string(rejected, "rejected")
        _distinct(chosen, rejected)
        if prompt is None:
            prompt, chosen, rejected = split_shared_text(chosen, rejected)
            implicit = True
            if not prompt.strip():
                raise RowProblem(
                    "chosen",
                    "chosen and rejected share no beginning, so the prompt cannot be "
                    "inferred; add a prompt field",
                )
            _string(chosen, "chosen")
            _string(rejected, "rejected")
        else:
            if isinstance(prompt, list):
                raise RowProblem(
                    "prompt",
                    "prompt is a message list but chosen and rejected are strings; "
                    "make them message lists too",
                )
            prompt = _string(prompt, "prompt")
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "implicit_prompt": implicit,
        **_criterion_fields(row),
    }


def parse_sft(row: dict[str, Any]) -> dict[str, Any]:
    """Fields of an :class:`SFTExample` (without ``source``) from one row."""
    if "messages" in row:
        messages = _check_turns(_messages(_require(row, "messages"), "messages"), "messages")
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
        if first is None:
            raise RowProblem("messages", "no assistant message to learn from")
        if not any(m["role"] == "user" for m in messages[:first]):
            raise RowProblem("messages", "no user message before the first assistant message")
        completion = messages[first:]
        if not any(m["content"].strip() for m in completion if m["role"] == "assistant"):
            raise RowProblem("messages", "every assistant message is empty")
        return {"prompt": messages[:first], "completion": completion}
    if "completion" in row:
        prompt, completion = _require(row, "prompt"), _require(row, "completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            prompt = (
                _messages(prompt, "prompt")
                if isinstance(prompt, list)
                else [{"role": "user", "content": _string(prompt, "prompt")}]
            )
            completion = (
                _messages(completion, "completion")
                if isinstance(completion, list)
                else [{"role": "assistant", "content": _string(completion, "completion")}]
            )
            return {
                "prompt": _check_prompt_messages(prompt, "prompt"),
                "completion": _completion_messages(completion, "completion"),
            }
        return {
            "prompt": _string(prompt, "prompt", allow_empty=True),
            "completion": _string(completion, "completion"),
        }
    return {"prompt": "", "completion": _string(_require(row, "text"), "text")}


def parse_unpaired(row: dict[str, Any]) -> dict[str, Any]:
    """Fields of an :class:`UnpairedExample` (without ``source``): TRL's unpaired format, a prompt
    and a completion (standard or conversational, as an SFT row's) and a boolean label."""
    label = _require(row, "label")
    if not isinstance(label, bool):
        raise RowProblem("label", f"expected true or false, got {_type_name(label)} {label!r}")
    return {
        **parse_sft({"prompt": _require(row, "prompt"), "completion": row.get("completion")}),
        "label": label,
    }


def _number(value: Any, field: str) -> float | None:
    """A score: a number or numeric string; ``None``, "" or "N/A" mean not rated."""
    if value is None or (isinstance(value, str) and value.strip().upper() in ("", "N/A", "NA", "NONE")):
        return None
    if isinstance(value, bool):
        raise RowProblem(field, f"expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RowProblem(field, f"expected a number, got {value!r}") from None
    if not isinstance(value, int | float):
        raise RowProblem(field, f"expected a number, got {_type_name(value)}")
    try:
        value = float(value)
    except OverflowError:
        raise RowProblem(field, "number too large") from None
    if not math.isfinite(value):
        raise RowProblem(field, f"expected a finite number, got {value}")
    return float(value)


def _rating(value: Any, field: str) -> float | None:
    if isinstance(value, dict):  # UltraFeedback: {"Rating": "4", "Rationale": "..."}
        key = next((k for k in ("Rating", "rating", "score", "Score") if k in value), None)
        if key is None:
            raise RowProblem(field, "rating object has no Rating/score field")
        return _number(value[key], f"{field}.{key}")
    return _number(value, field)


def _rated_completion(c: Any, field: str) -> RatedCompletion:
    if not isinstance(c, dict):
        raise RowProblem(field, f"expected an object with response and ratings, got {_type_name(c)}")
    response = _string(c.get("response"), f"{field}.response")
    key = "ratings" if "ratings" in c else "annotations"
    raw = c.get(key)
    if raw is not None and not isinstance(raw, dict):
        raise RowProblem(f"{field}.{key}", f"expected an object {{criterion: score}}, got {_type_name(raw)}")
    ratings = {_string(k, f"{field}.{key}"): _rating(v, f"{field}.{key}.{k}") for k, v in (raw or {}).items()}
    overall_key = "overall_score" if "overall_score" in c else "overall"
    overall = _number(c.get(overall_key), f"{field}.{overall_key}")
    if overall is None and all(v is None for v in ratings.values()):
        raise RowProblem(f"{field}.ratings", "no rating on any criterion and no overall score")
    model = c.get("model")
    cut_off = c.get("cut_off", False)
    if not isinstance(cut_off, bool):
        raise RowProblem(f"{field}.cut_off", f"must be true or false, got {cut_off!r}")
    return RatedCompletion(response, ratings, overall, model if isinstance(model, str) else None, cut_off)


def parse_multi_criteria(row: dict[str, Any]) -> dict[str, Any]:
    """Fields of a :class:`MultiCriteriaExample` (without ``source``) from one row."""
    field = "instruction" if "instruction" in row else "prompt"
    prompt: Text = _require(row, field)
    prompt = (
        _check_prompt_messages(_messages(prompt, field), field)
        if isinstance(prompt, list)
        else _string(prompt, field)
    )
    completions = _require(row, "completions")
    if not isinstance(completions, list):
        raise RowProblem("completions", f"expected a list of rated responses, got {_type_name(completions)}")
    if len(completions) < 2:
        raise RowProblem("completions", f"needs at least two responses to compare, got {len(completions)}")
    parsed = [_rated_completion(c, f"completions[{i}]") for i, c in enumerate(completions)]
    known = {field, "completions"}
    return {
        "prompt": prompt,
        "completions": parsed,
        "metadata": {k: v for k, v in row.items() if k not in known},
    }


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _kind_of(value: Any) -> str:
    return "a message list" if isinstance(value, list) else f"a {_type_name(value)}"


PARSERS = {
    DataKind.PREFERENCE: (parse_preference, PreferenceExample),
    DataKind.SFT: (parse_sft, SFTExample),
    DataKind.MULTI_CRITERIA: (parse_multi_criteria, MultiCriteriaExample),
    DataKind.UNPAIRED: (parse_unpaired, UnpairedExample),
}


def parse_row(kind: DataKind, row: dict[str, Any], ref: RowRef):
    """Parse ``row`` as ``kind``; raises :class:`RowProblem` naming the field at fault."""
    found = detect_kind(row)
    if found is None:
        raise RowProblem(
            None,
            f"no recognised fields (found {', '.join(map(str, row)) or 'none'}); "
            f"expected {EXPECTED_FIELDS[kind]}",
        )
    if kind == DataKind.UNPAIRED and found == DataKind.PREFERENCE:  # KTO: a pair is two completions
        kind = found
    elif found != kind:
        raise RowProblem(
            None,
            f"looks like {_article(found)} {found} row, but this dataset holds {kind} rows "
            f"({EXPECTED_FIELDS[kind]})",
        )
    parse, cls = PARSERS[kind]
    return cls(source=ref, **parse(row))
