"""``criteriapo data make-criteria``: a multi-criteria dataset made from the model being tuned.

Prompts come from task templates, each with 1 to 3 verifiable criteria written into it, in wordings
drawn from :mod:`criteriapo.criteria.phrasing`: held-out prompts use wordings that training never
does. Several replies per prompt are sampled from the model (batched, seeded, cached on disk) and
every one is scored on every criterion of its prompt by the checkers (1 pass, 0 fail), so the pairs
the recipes build are the model's own best against its own worst. Where no sample passes a
criterion, one more candidate is added: the best acceptable sample with natural edits for those
criteria (:mod:`criteriapo.criteria.edits`), never a repeated filler; and one decoy, rated 0 on
``as_asked``: the best sample with a format nobody asked for, or looping. A reply stopped by the
token limit is cut back to its last complete sentence. The result is UltraFeedback-like JSONL that
the data loader reads as ``multi_criteria``. Same seed, same model, same size: the same files.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from criteriapo.criteria.edits import looping, plain_sentences, satisfy, satisfy_all, trim_cut_off
from criteriapo.criteria.library import Criterion, parse_criterion
from criteriapo.criteria.phrasing import phrase_criterion, phrase_prompt, phrase_task
from criteriapo.criteria.quality import AS_ASKED, UNASKED, acceptable, repeated_span, unasked_format
from criteriapo.distributed import SINGLE, World, all_gather_objects, device_for, joined_shares, my_share
from criteriapo.fsutil import atomic_dir, cache_dir

LOOP_DECOYS = 1 / 3  # of the decoys, the share that loop instead of showing an unasked format
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
    samples: int = 4  # sampled replies per prompt (an edited one may come on top)
    held_out: float = 0.2
    seed: int = 0
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 0.95
    batch_size: int = 64  # sequences decoded together; larger batches amortise each step's cost on CPU
    decoys: float = 1.0  # share of prompts given a decoy (a reply with a format nobody asked for)


@dataclass(frozen=True)
class Drawn:
    """One made prompt: its topic, criteria, split and the text the user writes."""

    topic: str
    criteria: tuple[Criterion, ...]
    split: str  # "train" or "heldout"
    task: str
    text: str


def _family(spec: str) -> str:
    return spec.partition(":")[0]


def _criteria(rng: random.Random, topic: str) -> list[Criterion]:
    chosen: list[str] = []
    want = rng.randint(1, 3)
    for spec in rng.sample(POOL, len(POOL)):
        fam = _family(spec)
        if any({fam, _family(c)} in CONFLICTS or fam == _family(c) for c in chosen):
            continue
        chosen.append(spec.format(kw=topic.split()[-1]))
        if len(chosen) == want:
            break
    return [parse_criterion(s) for s in chosen]


def draw_prompts(n: int, seed: int, held_out: float = 0.2) -> list[Drawn]:
    """``n`` prompts, each a task with 1 to 3 compatible criteria. ``held_out`` of them (drawn at
    random) are held out and worded with the held-out phrasings of tasks and criteria."""
    order = list(range(n))
    random.Random(seed + 1).shuffle(order)
    held = set(order[: round(n * held_out)])
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        criteria = _criteria(rng, topic)
        split = "heldout" if i in held else "train"
        task = phrase_task(topic, split, rng)
        text = phrase_prompt(task, [phrase_criterion(c, split, rng) for c in criteria], rng)
        out.append(Drawn(topic, tuple(criteria), split, task, text))
    return out


def _samples_key(model_path: Path, prompts: list[str], opts: MakerOptions, device: str = "cpu") -> str:
    from criteriapo.models.refcache import folder_digest

    sampling = [opts.samples, opts.seed, opts.max_new_tokens, opts.temperature, opts.top_p, opts.batch_size]
    # "sampler": how the samples are drawn (each prompt computed once for all its samples; the
    # exponential race over the top 50 tokens)
    spec = {
        "model": folder_digest(model_path),
        "prompts": prompts,
        "opts": sampling,
        "sampler": "shared-race",
    }
    if device != "cpu":  # another device's arithmetic draws other replies from the same seed
        spec["device"] = device
    key = json.dumps(spec)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _sample_cached(
    model_path: Path, prompts: list[str], opts: MakerOptions, world: World = SINGLE, device: str = "cpu"
) -> list[list[dict]]:
    """``opts.samples`` replies per prompt (``{"text", "cut_off"}``), from the disk cache when this
    model (by the digest of its files), these prompts and these settings were sampled before.

    Under torchrun the batches are shared out whole (every N-th batch to each process, on its own
    device) and every process receives all the replies: a batch's generator is seeded by its first
    prompt's index, so the replies are those one process draws. Rank 0 writes the cache."""
    from criteriapo.models.loading import pick_device

    device = device_for(world, device)
    kind = pick_device(device).split(":")[0]
    path = cache_dir() / "samples" / f"{_samples_key(model_path, prompts, opts, kind)}.json"
    # every process takes part in the sampling unless every one of them finds the cache
    if all(all_gather_objects(path.exists(), world)):
        return json.loads(path.read_text(encoding="utf-8"))
    per_batch = max(1, opts.batch_size // opts.samples)  # prompts per batch, as generate_batch makes them
    batches = [(i, prompts[i : i + per_batch]) for i in range(0, len(prompts), per_batch)]
    mine = _sample_batches(model_path, my_share(batches, world), opts, device, world.main)
    replies = [r for batch in joined_shares(mine, world) for r in batch]
    if world.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(replies), encoding="utf-8")
        tmp.replace(path)
    return replies


def _sample_batches(
    model_path: Path, batches: list[tuple[int, list[str]]], opts: MakerOptions, device: str, shown: bool
) -> list[list[list[dict]]]:
    """The replies to each batch (its first prompt's index, its prompts), one list per batch."""
    from criteriapo.generation import Sampling, generate_batch
    from criteriapo.models import load_model, load_tokenizer
    from criteriapo.tracking.progress import work_progress

    model, tok = load_model(model_path, device=device), load_tokenizer(model_path)
    k, out = opts.samples, []
    with work_progress(
        f"sampling {k} replies per prompt", sum(len(b) for _, b in batches), shown=shown
    ) as advance:
        for first, batch in batches:
            convs = [[{"role": "user", "content": p}] for p in batch]
            # the generator one call over all the prompts gives this batch: the seed plus its first index
            sampling = Sampling(
                opts.max_new_tokens, opts.temperature, opts.top_p, seed=opts.seed * 1000 + first
            )
            flat = generate_batch(model, tok, convs, sampling, samples=k, batch_size=opts.batch_size)
            out.append(
                [
                    [{"text": r.text, "cut_off": r.cut_off} for r in flat[i : i + k]]
                    for i in range(0, len(flat), k)
                ]
            )
            advance(len(convs))
    return out


def _rate(text: str, drawn: Drawn) -> dict[str, float]:
    """1 or 0 per criterion of the prompt, and ``as_asked``: 1 when the reply neither loops nor shows
    a format the prompt did not ask for (see :mod:`criteriapo.criteria.quality`)."""
    asked = [c.name for c in drawn.criteria]
    return {c.name: float(c.passes(text)) for c in drawn.criteria} | {
        AS_ASKED: float(not unasked_format(text, asked) and repeated_span(text) is None)
    }


def make_record(drawn: Drawn, sampled: list[dict], model_name: str, decoy: bool = True) -> dict:
    """One multi-criteria row, every reply rated on every criterion and on ``as_asked``:

    - the sampled replies (a cut-off one trimmed to its last complete sentence, or kept and marked
      ``cut_off`` when it has none);
    - for the criteria no sample passes, the best acceptable sample edited to pass them;
    - when ``decoy``, a decoy rated 0 on ``as_asked``: the best sample with one format nobody asked
      for (a title, quotes, JSON, a P.S., capitals), so that a recipe can teach "when asked", not
      "always"; or, one time in :data:`LOOP_DECOYS`, the best sample with one of its sentences
      said three times, the way DPO-tuned models loop.

    The best sample comes first, so on ties it is the rejected reply against its own edit: a pair
    that differs only where the criterion does."""
    candidates: list[tuple[str, str, bool]] = []  # text, source, still cut off
    for s in sampled:
        trimmed = trim_cut_off(s["text"]) if s["cut_off"] else s["text"].strip()
        if trimmed or s["text"].strip():
            candidates.append((trimmed or s["text"].strip(), model_name, not trimmed))
    ratings = [_rate(t, drawn) for t, _, _ in candidates]
    rated_before = {t: r for (t, _, _), r in zip(candidates, ratings, strict=True)}
    usable = [i for i, (t, _, cut) in enumerate(candidates) if not cut and acceptable(t)]
    if usable:
        top = max(usable, key=lambda i: (sum(ratings[i].values()), -i))
        best = candidates[top][0]
        candidates.insert(0, candidates.pop(top))
        extra = [x for t, _, _ in candidates[1:] for x in plain_sentences(t)]
        unmet = [c for c in drawn.criteria if not any(r[c.name] for r in ratings)]
        edited = satisfy_all(best, unmet, drawn.topic, extra) if unmet else None
        if edited is not None:
            candidates.append((edited, "edit:" + "+".join(c.name for c in unmet), False))
        asked = {c.name.partition(":")[0] for c in drawn.criteria}
        unasked = [f for f in UNASKED if f not in asked]
        rng = random.Random(drawn.text)
        if decoy and rng.random() < LOOP_DECOYS:
            looped = looping(best, rng.randrange(1 << 16))
            if looped is not None and repeated_span(looped) is not None:
                candidates.append((looped, "decoy:loop", False))
        elif decoy and unasked:
            family = rng.choice(unasked)
            shown = satisfy(best, parse_criterion(family), drawn.topic, extra)
            if shown is not None:
                candidates.append((shown, f"decoy:{family}", False))
    seen, completions = set(), []
    for text, source, cut in candidates:
        if text in seen:
            continue
        seen.add(text)
        rating = rated_before[text] if text in rated_before else _rate(text, drawn)  # edits are new
        rated = {"response": text, "model": source, "ratings": rating}
        completions.append(rated | ({"cut_off": True} if cut else {}))
    return {
        "prompt": [{"role": "user", "content": drawn.text}],
        "criteria": [c.name for c in drawn.criteria] + [AS_ASKED],
        "task": drawn.task,
        "completions": completions,
    }


def decoy_prompts(n: int, seed: int, share: float) -> list[bool]:
    """Which of ``n`` prompts get a decoy: each with probability ``share``, seeded."""
    rng = random.Random(f"decoys {seed}")
    return [rng.random() < share for _ in range(n)]


def maker_digest(opts: MakerOptions) -> str:
    """Names what the maker would make: its options and the code of the maker, wordings, edits and
    checkers (the model is named by the caller)."""
    from criteriapo.criteria import edits, library, phrasing, quality

    h = hashlib.sha256(json.dumps(asdict(opts), sort_keys=True).encode())
    for module in (edits, library, phrasing, quality):
        h.update(Path(module.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:12]


def make_criteria_dataset(
    out_dir: Path,
    model: str = "smollm2",
    opts: MakerOptions = MakerOptions(),
    world: World = SINGLE,
    device: str = "cpu",
) -> dict:
    """Write ``train.jsonl`` and ``heldout.jsonl`` into ``out_dir`` (atomically); returns counts.
    Under torchrun every process calls it, samples its share (:func:`_sample_cached`) and rank 0
    writes the folder."""
    from criteriapo.models import resolve_model

    source = resolve_model(model)
    drawn = draw_prompts(opts.prompts, opts.seed, opts.held_out)
    texts = [d.text for d in drawn]
    sampled = _sample_cached(source.path, texts, opts, world, device) if opts.samples else [[] for _ in texts]
    decoys = decoy_prompts(len(drawn), opts.seed, opts.decoys)
    made = [make_record(d, s, source.spec, decoy=y) for d, s, y in zip(drawn, sampled, decoys, strict=True)]
    # a prompt whose replies were all empty but one (and that no edit or decoy could add to) has
    # nothing to compare: it is left out, and counted
    kept = [(d, r) for d, r in zip(drawn, made, strict=True) if len(r["completions"]) >= 2]
    if world.main:
        with atomic_dir(out_dir) as tmp:
            for split in ("heldout", "train"):
                lines = [json.dumps(r) + "\n" for d, r in kept if d.split == split]
                (tmp / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    counts = {split: sum(d.split == split for d, _ in kept) for split in ("train", "heldout")}
    rows = [r for _, r in kept]
    return counts | {
        "completions": sum(len(r["completions"]) for r in rows),
        "edited": sum(c["model"].startswith("edit:") for r in rows for c in r["completions"]),
        "left_out": len(made) - len(kept),
    }
