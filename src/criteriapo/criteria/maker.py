"""``criteriapo data make-criteria``: a multi-criteria dataset the project makes itself.

Prompts come from task templates, each with 1 to 3 verifiable criteria written into it. Candidate
replies are sampled from a model (batched, seeded, cached on disk) and joined by controlled edits:
one that satisfies every criterion and, per criterion, one that breaks only that one. Every reply is
scored on every criterion of its prompt by the checkers (1 pass, 0 fail). Prompts are split into
train and held-out. The result is UltraFeedback-like JSONL that the data loader reads as
``multi_criteria``. Same seed, same model, same size: the same files.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from criteriapo.criteria.edits import break_, satisfy
from criteriapo.criteria.library import Criterion, parse_criterion
from criteriapo.fsutil import cache_dir, publish_dir, staging_dir

TOPICS = [
    "the ocean",
    "coffee",
    "rain",
    "a city park",
    "winter",
    "bicycles",
    "honey bees",
    "the moon",
    "libraries",
    "volcanoes",
    "trains",
    "tea",
    "forests",
    "the internet",
    "chess",
    "gardening",
    "bread",
    "rivers",
    "music",
    "deserts",
    "owls",
    "bridges",
    "umbrellas",
    "mountains",
    "recycling",
    "clocks",
    "lighthouses",
    "apples",
    "museums",
    "thunderstorms",
    "kites",
    "maps",
    "penguins",
    "soap",
    "candles",
    "elephants",
    "sailing",
    "glass",
    "the alphabet",
    "sleep",
]
TASKS = [
    "Describe {t}.",
    "Explain why people like {t}.",
    "Give advice to someone curious about {t}.",
    "Write a short note about {t}.",
    "Tell me an interesting fact about {t}.",
]
# criteria drawn for prompts; families that cannot hold together are never drawn together
POOL = [
    "max_words:20",
    "max_words:40",
    "min_words:50",
    "max_sentences:2",
    "paragraphs:2",
    "bullets:3",
    "lowercase",
    "uppercase",
    "no_commas",
    "json",
    "title",
    "quoted",
    "postscript",
    "starts_with:Sure",
    "ends_with:Done",
    "include:{kw}",
    "avoid:very",
]
CONFLICTS = [
    {"lowercase", "uppercase"},
    {"max_words", "min_words"},
    {"json", "bullets"},
    {"json", "title"},
    {"json", "quoted"},
    {"json", "paragraphs"},
    {"json", "postscript"},
    {"json", "starts_with"},
    {"json", "ends_with"},
    {"quoted", "title"},
    {"quoted", "bullets"},
    {"quoted", "postscript"},
    {"quoted", "starts_with"},
    {"quoted", "ends_with"},
    {"max_sentences", "paragraphs"},
    {"max_sentences", "bullets"},
    {"bullets", "paragraphs"},
    {"max_words", "paragraphs"},
    {"min_words", "max_sentences"},
    {"uppercase", "starts_with"},
    {"uppercase", "ends_with"},
    {"lowercase", "starts_with"},
    {"lowercase", "ends_with"},
    {"postscript", "ends_with"},
    {"max_words", "bullets"},
    {"max_words", "postscript"},
    {"title", "starts_with"},
]


@dataclass(frozen=True)
class MakerOptions:
    prompts: int = 160
    samples: int = 1  # sampled replies per prompt (edits come on top)
    held_out: float = 0.2
    seed: int = 0
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    batch_size: int = 64  # larger batches amortise the per-step cost of decoding on CPU


def _family(spec: str) -> str:
    return spec.partition(":")[0]


def draw_prompts(n: int, seed: int) -> list[tuple[str, list[Criterion]]]:
    """``n`` (task, criteria) pairs: each task from the templates, 1 to 3 compatible criteria."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        task = TASKS[(i // len(TOPICS) + rng.randrange(len(TASKS))) % len(TASKS)].format(t=topic)
        chosen: list[str] = []
        want = rng.randint(1, 3)
        for spec in rng.sample(POOL, len(POOL)):
            fam = _family(spec)
            if any({fam, _family(c)} in CONFLICTS or fam == _family(c) for c in chosen):
                continue
            chosen.append(spec.format(kw=topic.split()[-1]))
            if len(chosen) == want:
                break
        out.append((task, [parse_criterion(s) for s in chosen]))
    return out


def prompt_text(task: str, criteria: list[Criterion]) -> str:
    return " ".join([task, *(c.description for c in criteria)])


def _sample_cached(model_path: Path, prompts: list[str], opts: MakerOptions) -> list[list[str]]:
    """``opts.samples`` replies per prompt, from the disk cache when this exact request was made before."""
    from criteriapo.generation import sample_batch
    from criteriapo.models import load_model, load_tokenizer

    marker = (
        (model_path / "model.safetensors").stat() if (model_path / "model.safetensors").exists() else None
    )
    key = json.dumps(
        {
            "model": str(model_path.resolve()),
            "mtime": marker.st_mtime_ns if marker else None,
            "prompts": prompts,
            "opts": [
                opts.samples,
                opts.seed,
                opts.max_new_tokens,
                opts.temperature,
                opts.top_p,
                opts.batch_size,
            ],
        }
    )
    path = cache_dir() / "samples" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    model, tok = load_model(model_path), load_tokenizer(model_path)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    rounds = [
        sample_batch(
            model,
            tok,
            convs,
            max_new_tokens=opts.max_new_tokens,
            temperature=opts.temperature,
            top_p=opts.top_p,
            seed=opts.seed * 1000 + k,
            batch_size=opts.batch_size,
        )
        for k in range(opts.samples)
    ]
    replies = [list(r) for r in zip(*rounds, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(replies), encoding="utf-8")
    tmp.replace(path)
    return replies


def make_record(task: str, criteria: list[Criterion], sampled: list[str], model_name: str) -> dict:
    """One multi-criteria row: sampled replies plus edits, each scored on every criterion."""
    base = sampled[0] if sampled else task
    candidates = [(r, model_name) for r in sampled]
    good = base
    for c in criteria:
        good = satisfy(good, c)
    candidates.append((good, "edit:satisfy-all"))
    for c in criteria:
        candidates.append((break_(good, c), f"edit:break:{c.name}"))
    seen, completions = set(), []
    for text, source in candidates:
        if text in seen or not text.strip():
            continue
        seen.add(text)
        completions.append(
            {"response": text, "model": source, "ratings": {c.name: float(c.passes(text)) for c in criteria}}
        )
    return {
        "prompt": [{"role": "user", "content": prompt_text(task, criteria)}],
        "criteria": [c.name for c in criteria],
        "task": task,
        "completions": completions,
    }


def maker_digest(opts: MakerOptions) -> str:
    """Names what the maker would make: its options and the code of the maker, edits and checkers."""
    from criteriapo.criteria import edits, library

    h = hashlib.sha256(json.dumps(asdict(opts), sort_keys=True).encode())
    for module in (edits, library):
        h.update(Path(module.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:12]


def make_criteria_dataset(out_dir: Path, model: str = "smollm2", opts: MakerOptions = MakerOptions()) -> dict:
    """Write ``train.jsonl`` and ``heldout.jsonl`` into ``out_dir`` (atomically); returns counts."""
    from criteriapo.models import resolve_model

    source = resolve_model(model)
    drawn = draw_prompts(opts.prompts, opts.seed)
    texts = [prompt_text(t, cs) for t, cs in drawn]
    sampled = _sample_cached(source.path, texts, opts) if opts.samples else [[] for _ in texts]
    rows = [make_record(t, cs, s, source.spec) for (t, cs), s in zip(drawn, sampled, strict=True)]
    order = list(range(len(rows)))
    random.Random(opts.seed + 1).shuffle(order)
    n_held = round(len(rows) * opts.held_out)
    parts = {"heldout": sorted(order[:n_held]), "train": sorted(order[n_held:])}
    tmp = staging_dir(out_dir)
    for name, idx in parts.items():
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in idx), encoding="utf-8")
    publish_dir(tmp, out_dir)
    return {name: len(idx) for name, idx in parts.items()} | {
        "completions": sum(len(r["completions"]) for r in rows)
    }
