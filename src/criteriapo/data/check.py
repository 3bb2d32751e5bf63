"""``criteriapo data check``: what a dataset holds, how long it is in tokens, and what is wrong."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from criteriapo.data.formats import DataKind
from criteriapo.data.loading import LoadedData, read_data
from criteriapo.data.readers import MAX_ROW_BYTES
from criteriapo.data.records import BadRow, MultiCriteriaExample, PreferenceExample, RowProblem
from criteriapo.data.tokenize import ChatTokenizer, PromptTooLong, TokenizeOptions


@dataclass
class LengthStats:
    name: str
    values: list[int]

    def row(self) -> list[str]:
        v = sorted(self.values)
        pct = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
        return [self.name, str(v[0]), f"{mean(v):.1f}", str(pct(0.5)), str(pct(0.95)), str(v[-1])]


@dataclass
class CheckReport:
    loaded: LoadedData
    lengths: list[LengthStats] = field(default_factory=list)
    over_max_length: int = 0
    prompts_cut: int = 0  # rows whose prompt is cut to leave its completion room (long_prompts: cut)
    prompts_dropped: int = 0  # rows left out for it (long_prompts: drop)
    token_problems: list[BadRow] = field(default_factory=list)
    criteria: dict[str, int] = field(default_factory=dict)

    @property
    def problems(self) -> list[BadRow]:
        return sorted(self.loaded.bad_rows + self.token_problems, key=lambda b: (b.file, b.row))


def check_data(
    path: str | Path,
    *,
    kind: DataKind | str = "auto",
    split: str | None = None,
    tokenizer=None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_row_bytes: int | None = MAX_ROW_BYTES,
    long_prompts: str = "cut",
) -> CheckReport:
    """Read every row (so every problem is listed, rows over ``max_row_bytes`` among them), then
    measure token lengths."""
    loaded = read_data(path, kind=kind, split=split, max_row_bytes=max_row_bytes)
    report = CheckReport(loaded)
    for ex in loaded.examples:
        if isinstance(ex, MultiCriteriaExample):
            for name in ex.criteria:
                report.criteria[name] = report.criteria.get(name, 0) + 1
        elif isinstance(ex, PreferenceExample) and ex.criteria_labels:
            for name in ex.criteria_labels:
                report.criteria[name] = report.criteria.get(name, 0) + 1
        elif isinstance(ex, PreferenceExample) and ex.criterion:
            report.criteria[ex.criterion] = report.criteria.get(ex.criterion, 0) + 1
    if tokenizer is not None and loaded.kind != DataKind.MULTI_CRITERIA:
        limits = TokenizeOptions(max_length, max_prompt_length, long_prompts=long_prompts)
        _measure(report, tokenizer, limits)
    return report


def _measure(report: CheckReport, tok: ChatTokenizer, limits: TokenizeOptions) -> None:
    untruncated = TokenizeOptions(max_length=None)
    max_length = limits.max_length
    cols: dict[str, list[int]] = {}
    for ex in report.loaded.examples:
        encode = tok.encode_pair if isinstance(ex, PreferenceExample) else tok.encode_sft
        try:
            t = encode(ex, untruncated)
        except RowProblem as p:
            report.token_problems.append(BadRow(ex.source.file, ex.source.row, p.field, p.reason))
            continue
        if isinstance(ex, PreferenceExample):
            longest = len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids))
            sizes = {
                "prompt": len(t.prompt_ids),
                "chosen": len(t.chosen_ids),
                "rejected": len(t.rejected_ids),
                "longest sequence": longest,
            }
        else:
            longest = len(t.input_ids)
            sizes = {"sequence": longest, "trained": t.num_loss_tokens}
        for k, v in sizes.items():
            cols.setdefault(k, []).append(v)
        if max_length is not None:
            try:
                fitted = encode(ex, limits)  # under long_prompts: error, a long prompt is a problem
            except PromptTooLong:
                report.prompts_dropped += 1
                continue
            except RowProblem as p:
                report.token_problems.append(BadRow(ex.source.file, ex.source.row, p.field, p.reason))
                continue
            report.over_max_length += int(longest > max_length)
            report.prompts_cut += int(fitted.prompt_cut > 0)
    report.lengths = [LengthStats(k, v) for k, v in cols.items()]
