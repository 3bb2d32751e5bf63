"""``criteriapo eval``: how each model does on each criterion.

For every model: held-out preference accuracy overall (vanilla pairs) and per criterion
(finegrained pairs), the pass rate per criterion of its own replies to the held-out prompts
(batched, fixed seed), checked by the criteria's programs, and how often those replies loop or are
cut off by the token limit, with their mean length (:mod:`criteriapo.criteria.quality`), and with
a reference model (the one DPO started from) the reward accuracy against it on the vanilla pairs.
Several models make one markdown table and one bar chart.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from math import isnan, nan
from pathlib import Path

from criteriapo.criteria.library import parse_criterion
from criteriapo.criteria.pairs import build_finegrained, build_vanilla
from criteriapo.criteria.quality import quality_summary, reply_quality
from criteriapo.data.records import MultiCriteriaExample
from criteriapo.data.tokenize import ChatTokenizer, TokenizeOptions, tokenize_examples
from criteriapo.distributed import SINGLE, World, barrier, joined_shares, my_share
from criteriapo.errors import ConfigError
from criteriapo.eval.preference import preference_eval
from criteriapo.generation import Sampling


@dataclass
class ModelReport:
    name: str
    accuracy: float
    accuracy_by_criterion: dict[str, float]
    pass_rate: float
    pass_by_criterion: dict[str, float]
    samples: list[dict] = field(default_factory=list)
    quality: dict[str, float] = field(default_factory=dict)  # repetition, empty and cut-off rates, words
    reward_accuracy: float | None = None  # against the reference, on the vanilla pairs (TRL's name)
    reward_margin: float | None = None


def family(criterion: str) -> str:
    return criterion.partition(":")[0]


def evaluate_model(
    name: str,
    model_spec: str,
    examples: list[MultiCriteriaExample],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    reference: str | None = None,
    beta: float = 0.1,
    device: str = "auto",
    world: World = SINGLE,
) -> ModelReport:
    """One model on held-out criteria data: rewards against ``reference`` (the model DPO started
    from) on the vanilla and finegrained pairs, and its replies judged (:func:`_judge_replies`).
    With several processes (``world``, each with the whole model), each scores and generates its
    share and all get the same report."""
    from criteriapo.models import load_model, load_tokenizer, resolve_model
    from criteriapo.train.guard import guard_model

    source = resolve_model(model_spec)
    is_reference = reference is not None and resolve_model(reference).path == source.path
    if is_reference:
        reference = None  # its own rewards are 0 by definition: reported as "-"
    model, tok = load_model(source, device=device), load_tokenizer(source)
    chat = ChatTokenizer(tok, name=name)
    opts = TokenizeOptions(max_length=None)
    vanilla = tokenize_examples(build_vanilla(examples), chat, opts, on_bad_row="skip")
    fine = tokenize_examples(build_finegrained(examples), chat, opts, on_bad_row="skip")
    pad = tok.pad_token_id
    pack = guard_model(model, vanilla, "dpo", pad, True) if vanilla else False
    scores, fine_scores = _scores(name, source, model, (vanilla, fine), pad, batch_size, pack, world)
    ref_scores, ref_fine = (
        _reference_scores(reference, (vanilla, fine), pad, batch_size, pack, device, world)
        if reference
        else (None, None)
    )
    overall = preference_eval(scores, vanilla, ref_scores, beta)
    margin = fine_scores.margins
    if ref_fine is not None:  # per criterion, what DPO optimises: the reward, not the sum
        margin = margin - ref_fine.margins
    by_family: dict[str, list[float]] = defaultdict(list)
    for p, ok in zip(fine, (margin > 0).tolist(), strict=True):
        by_family[family(p.criterion)].append(nan if is_reference else float(ok))
    sampling = Sampling(max_new_tokens, temperature, top_p=0.95, seed=seed)  # top_p: when sampled
    passes, samples, qualities = _judge_replies(name, model, tok, examples, sampling, batch_size, world)
    flat = [v for vs in passes.values() for v in vs]
    return ModelReport(
        name,
        overall.accuracy,
        {k: sum(v) / len(v) for k, v in sorted(by_family.items())},
        sum(flat) / max(1, len(flat)),
        {k: sum(v) / len(v) for k, v in sorted(passes.items())},
        samples,
        quality_summary(qualities),
        overall.reward_accuracy,
        overall.reward_margin,
    )


def _judge_replies(
    name: str,
    model,
    tok,
    examples: list[MultiCriteriaExample],
    sampling: Sampling,
    batch_size: int,
    world: World = SINGLE,
) -> tuple[dict[str, list[float]], list[dict], list]:
    """The model's replies to the held-out prompts (each process answers its share), each judged by
    the checkers of its prompt's criteria and by the quality guards."""
    from criteriapo.generation import generate_batch
    from criteriapo.tracking.progress import work_progress

    prompts = [
        e.prompt if isinstance(e.prompt, list) else [{"role": "user", "content": e.prompt}] for e in examples
    ]
    mine = my_share(prompts, world)
    with work_progress(f"{name}: replying to held-out prompts", len(mine), shown=world.main) as advance:
        replies = generate_batch(model, tok, mine, sampling, batch_size=batch_size, progress=advance)
    replies = joined_shares(replies, world)
    passes: dict[str, list[float]] = defaultdict(list)
    samples = []
    asked = [_verifiable(e.metadata.get("criteria", e.criteria)) for e in examples]
    qualities = [
        reply_quality(r.text, r.cut_off, [c.name for c in cs]) for r, cs in zip(replies, asked, strict=True)
    ]
    for prompt, reply, q, criteria in zip(prompts, replies, qualities, asked, strict=True):
        text = reply.text
        verdicts = {c.name: c.passes(text) for c in criteria}
        for c, ok in verdicts.items():
            passes[family(c)].append(float(ok))
        samples.append(
            {"prompt": prompt[-1]["content"], "reply": text, "passes": verdicts, "problems": q.problems()}
        )
    return passes, samples, qualities


def _scores(name: str, source, model, groups: tuple[list, ...], pad: int, batch_size: int, pack, world):
    """A model's scores of each group of pairs: vanilla and finegrained pairs share most replies, so
    each sequence is scored once (every process its share), and kept (:func:`_score_cache`)."""
    from criteriapo.tracking.progress import work_progress
    from criteriapo.train.scores import score_pairs

    seen = _score_cache(source, model, pack)
    with work_progress(f"{name}: scoring held-out pairs", sum(map(len, groups)), shown=world.main) as advance:
        scores = [
            score_pairs(model, g, pad, batch_size, seen, pack, progress=advance, world=world) for g in groups
        ]
    _save(seen, world)
    return scores


def _reference_scores(
    reference: str,
    groups: tuple[list, ...],
    pad: int,
    batch_size: int,
    pack: bool,
    device: str = "auto",
    world: World = SINGLE,
):
    """The reference model's scores of each group of pairs (None for an empty group), loaded once and
    each distinct sequence scored once (or read from its cache); kept for the next model evaluated
    against this reference."""
    from criteriapo.models import load_model, resolve_model

    ids = tuple(tuple((*p.prompt_ids, -1, *p.chosen_ids, -1, *p.rejected_ids) for p in g) for g in groups)
    key = (reference, pack, device, ids)
    if key not in _REFERENCE:
        _REFERENCE.clear()  # one reference and data at a time
        source = resolve_model(reference)
        ref = load_model(source, device=device)
        scores = _scores("reference", source, ref, groups, pad, batch_size, pack, world)
        _REFERENCE[key] = [s if g else None for s, g in zip(scores, groups, strict=True)]
    return _REFERENCE[key]


def _score_cache(source, model, pack: bool):
    """``model``'s log-prob of each sequence, kept on disk under the digest of its files (see
    :mod:`criteriapo.models.refcache`): the model DPO started from was scored on most of these
    sequences by its DPO stage, and a model evaluated again scores nothing twice."""
    from criteriapo.models.refcache import reference_cache, score_layout
    from criteriapo.train.precision import precision_of

    folders = [p for p in (source.path, source.base) if p]
    autocast = precision_of(model, "auto").autocast
    return reference_cache(folders, model, autocast, score_layout(pack))


def _save(cache, world: World) -> None:
    """Rank 0 writes the scores every process holds; the others wait, so that a cache read next is
    the same file on every process (:func:`score_pairs` needs the same cache everywhere)."""
    if world.main:
        cache.save()
    barrier(world)


_REFERENCE: dict = {}


def _verifiable(names: list[str]) -> list:
    """The criteria a program can check; rated-only ones (e.g. helpfulness) have no pass rate."""
    out = []
    for n in names:
        try:
            out.append(parse_criterion(n))
        except ConfigError:
            continue
    return out


def _cell(x: float) -> str:
    return "-" if isnan(x) else f"{x:.2f}"


def markdown_table(reports: list[ModelReport]) -> str:
    rewards = any(r.reward_accuracy is not None for r in reports)
    basis = "reward against the reference; - for the reference itself" if rewards else "summed log-probs"
    fams = sorted({k for r in reports for k in r.pass_by_criterion})
    head = ["model", "reward acc.", "pref. acc.", "pass rate", "loops", "cut off", "unasked", "words", *fams]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        q = r.quality
        cells = [
            r.name,
            "-" if r.reward_accuracy is None else f"{r.reward_accuracy:.3f}",
            f"{r.accuracy:.3f}",
            f"{r.pass_rate:.3f}",
            f"{q.get('repetition_rate', float('nan')):.2f}",
            f"{q.get('cut_off_rate', float('nan')):.2f}",
            f"{q.get('unasked_format_rate', float('nan')):.2f}",
            f"{q.get('mean_words', float('nan')):.0f}",
            *(f"{r.pass_by_criterion.get(f, float('nan')):.2f}" for f in fams),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Held-out preference accuracy per criterion (finegrained pairs, {basis}):",
        "",
        "| model | " + " | ".join(fams) + " |",
        "|" + "---|" * (len(fams) + 1),
    ]
    for r in reports:
        lines.append(
            "| " + " | ".join([r.name, *(_cell(r.accuracy_by_criterion.get(f, nan)) for f in fams)]) + " |"
        )
    return "\n".join(lines) + "\n"


def bar_chart(reports: list[ModelReport], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = sorted({k for r in reports for k in r.pass_by_criterion})
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(max(6, len(fams) * 0.9), 4))
    for i, r in enumerate(reports):
        xs = [j + i * width for j in range(len(fams))]
        ax.bar(xs, [r.pass_by_criterion.get(f, 0.0) for f in fams], width, label=r.name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(fams))], fams, rotation=45, ha="right")
    ax.set_ylabel("pass rate on held-out prompts")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(
    models: list[tuple[str, str]],
    data: list[MultiCriteriaExample],
    out_dir: Path,
    world: World = SINGLE,
    **kw,
) -> list[ModelReport]:
    """Evaluate (name, model) pairs; write comparison.md, comparison.json and comparison.png. With
    ``reference`` (a model), each model's reward accuracy against it is reported too. With several
    processes, every one evaluates its share and returns the reports; rank 0 writes the files."""
    if not models:
        raise ConfigError("name at least one model to evaluate")
    reports = [evaluate_model(name, spec, data, world=world, **kw) for name, spec in models]
    if not world.main:
        return reports
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.md").write_text(markdown_table(reports), encoding="utf-8")
    (out_dir / "comparison.json").write_text(
        json.dumps([r.__dict__ for r in reports], indent=2), encoding="utf-8"
    )
    bar_chart(reports, out_dir / "comparison.png")
    return reports
