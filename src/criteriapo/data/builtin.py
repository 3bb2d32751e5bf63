"""A small built-in dataset the project makes itself, deterministic for a seed.

Facts are asked plainly for SFT (question -> one-sentence answer). For DPO the same kind of
question comes with a formatting instruction; the chosen reply follows it, the rejected reply is
the plain sentence. Facts are split between train and held-out, so held-out preference accuracy
measures whether the model learned to follow the instruction, not the fact.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from criteriapo.fsutil import atomic_dir, cache_dir

FACTS = [
    ("What is the capital of France?", "Paris", "The capital of France is Paris."),
    ("What is the capital of Japan?", "Tokyo", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "Rome", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "Madrid", "The capital of Spain is Madrid."),
    ("What is the capital of Germany?", "Berlin", "The capital of Germany is Berlin."),
    ("What is the capital of Canada?", "Ottawa", "The capital of Canada is Ottawa."),
    ("What is the capital of Egypt?", "Cairo", "The capital of Egypt is Cairo."),
    ("What is the capital of Kenya?", "Nairobi", "The capital of Kenya is Nairobi."),
    ("What is the capital of Peru?", "Lima", "The capital of Peru is Lima."),
    ("What is the capital of Norway?", "Oslo", "The capital of Norway is Oslo."),
    ("What is the capital of Greece?", "Athens", "The capital of Greece is Athens."),
    ("What is the capital of Portugal?", "Lisbon", "The capital of Portugal is Lisbon."),
    ("What is the capital of Russia?", "Moscow", "The capital of Russia is Moscow."),
    ("What is the capital of China?", "Beijing", "The capital of China is Beijing."),
    ("What is the capital of India?", "Delhi", "The capital of India is New Delhi."),
    ("What is the capital of Australia?", "Canberra", "The capital of Australia is Canberra."),
    (
        "What is the largest planet in the solar system?",
        "Jupiter",
        "Jupiter is the largest planet in the solar system.",
    ),
    ("Which planet is closest to the Sun?", "Mercury", "Mercury is the planet closest to the Sun."),
    ("Which planet is known as the Red Planet?", "Mars", "Mars is known as the Red Planet."),
    ("What is the largest ocean on Earth?", "Pacific", "The Pacific is the largest ocean on Earth."),
    ("What is the longest river in Africa?", "Nile", "The Nile is the longest river in Africa."),
    ("What is the tallest mountain on Earth?", "Everest", "Mount Everest is the tallest mountain on Earth."),
    (
        "What gas do plants absorb from the air?",
        "Carbon dioxide",
        "Plants absorb carbon dioxide from the air.",
    ),
    ("What gas do humans need to breathe?", "Oxygen", "Humans need oxygen to breathe."),
    ("What is the chemical symbol for gold?", "Au", "The chemical symbol for gold is Au."),
    ("What is the chemical symbol for water?", "H2O", "The chemical formula for water is H2O."),
    ("What is the freezing point of water in Celsius?", "Zero", "Water freezes at zero degrees Celsius."),
    ("What is the boiling point of water in Celsius?", "100", "Water boils at 100 degrees Celsius."),
    ("How many days are in a week?", "Seven", "There are seven days in a week."),
    ("How many months are in a year?", "Twelve", "There are twelve months in a year."),
    ("How many legs does a spider have?", "Eight", "A spider has eight legs."),
    ("How many legs does an insect have?", "Six", "An insect has six legs."),
    ("How many continents are there?", "Seven", "There are seven continents."),
    ("What is two plus two?", "Four", "Two plus two is four."),
    ("What is five times three?", "Fifteen", "Five times three is fifteen."),
    ("What is ten minus four?", "Six", "Ten minus four is six."),
    ("What is half of twenty?", "Ten", "Half of twenty is ten."),
    ("What color is the sky on a clear day?", "Blue", "The sky is blue on a clear day."),
    ("What color are ripe bananas?", "Yellow", "Ripe bananas are yellow."),
    ("What color is grass?", "Green", "Grass is green."),
    ("What do bees make?", "Honey", "Bees make honey."),
    (
        "What animal is known as the king of the jungle?",
        "Lion",
        "The lion is known as the king of the jungle.",
    ),
    ("What is the largest mammal?", "Blue whale", "The blue whale is the largest mammal."),
    ("What is the fastest land animal?", "Cheetah", "The cheetah is the fastest land animal."),
    ("Which bird is a symbol of peace?", "Dove", "The dove is a symbol of peace."),
    ("Who wrote Romeo and Juliet?", "Shakespeare", "William Shakespeare wrote Romeo and Juliet."),
    ("Who painted the Mona Lisa?", "Leonardo", "Leonardo da Vinci painted the Mona Lisa."),
    (
        "Who developed the theory of relativity?",
        "Einstein",
        "Albert Einstein developed the theory of relativity.",
    ),
    ("What is the hardest natural substance?", "Diamond", "Diamond is the hardest natural substance."),
    (
        "What is the main language spoken in Brazil?",
        "Portuguese",
        "The main language spoken in Brazil is Portuguese.",
    ),
    ("What is the currency of Japan?", "Yen", "The currency of Japan is the yen."),
    (
        "What is the currency of the United Kingdom?",
        "Pound",
        "The currency of the United Kingdom is the pound.",
    ),
    ("Which organ pumps blood through the body?", "Heart", "The heart pumps blood through the body."),
    ("Which organ do humans think with?", "Brain", "Humans think with the brain."),
    ("What is frozen water called?", "Ice", "Frozen water is called ice."),
    (
        "What star is at the center of our solar system?",
        "Sun",
        "The Sun is at the center of our solar system.",
    ),
    ("What is the opposite of hot?", "Cold", "The opposite of hot is cold."),
    ("What is the opposite of up?", "Down", "The opposite of up is down."),
    ("How many hours are in a day?", "Twenty-four", "There are twenty-four hours in a day."),
    ("How many sides does a triangle have?", "Three", "A triangle has three sides."),
]

# instruction -> how a reply that follows it is written, from (short answer, sentence)
INSTRUCTIONS = {
    "uppercase": ("Answer in capital letters only.", lambda short, sentence: sentence.upper()),
    "prefix": ("Start your answer with 'Answer:'.", lambda short, sentence: f"Answer: {sentence}"),
    "json": ('Reply in JSON with the key "answer".', lambda short, sentence: json.dumps({"answer": short})),
    "suffix": ("End your reply with the word 'Done'.", lambda short, sentence: f"{sentence} Done"),
    "one_word": ("Reply with one word.", lambda short, sentence: short.split()[0]),
    "quotes": ("Wrap your whole reply in double quotes.", lambda short, sentence: f'"{sentence}"'),
    "bullet": ("Answer as a single bullet point.", lambda short, sentence: f"- {sentence}"),
}
NAMES = ("sft", "preference-train", "preference-eval")


def make_rows(seed: int = 0, held_out: float = 0.25) -> dict[str, list[dict]]:
    """SFT rows (train facts only) and preference pairs split by fact into train and held-out."""
    rng = random.Random(seed)
    facts = FACTS[:]
    rng.shuffle(facts)
    n_eval = round(len(facts) * held_out)
    split = {"eval": facts[:n_eval], "train": facts[n_eval:]}

    def user(text: str) -> list[dict]:
        return [{"role": "user", "content": text}]

    def assistant(text: str) -> list[dict]:
        return [{"role": "assistant", "content": text}]

    sft = [{"messages": user(q) + assistant(sentence)} for q, _, sentence in split["train"]]
    pairs = {}
    for part, fs in split.items():
        rows = []
        for q, short, sentence in fs:
            for name, (instruction, follow) in INSTRUCTIONS.items():
                rows.append(
                    {
                        "prompt": user(f"{q} {instruction}"),
                        "chosen": assistant(follow(short, sentence)),
                        "rejected": assistant(sentence),
                        "criterion": name,
                    }
                )
        rng.shuffle(rows)
        pairs[part] = rows
    return {"sft": sft, "preference-train": pairs["train"], "preference-eval": pairs["eval"]}


def builtin_path(name: str, seed: int = 0) -> Path:
    """The JSONL file of built-in dataset ``name``, written (atomically) on first use."""
    if name not in NAMES:
        raise ValueError(f"unknown built-in dataset {name!r}; built-in: {', '.join(NAMES)}")
    files = {k: "".join(json.dumps(r) + "\n" for r in rows) for k, rows in make_rows(seed).items()}
    digest = hashlib.sha256("".join(files.values()).encode()).hexdigest()[
        :12
    ]  # a changed maker, a new folder
    folder = cache_dir() / "data" / f"builtin-seed{seed}-{digest}"
    if not folder.exists():
        with atomic_dir(folder) as tmp:
            for key, text in files.items():
                (tmp / f"{key}.jsonl").write_text(text, encoding="utf-8")
    return folder / f"{name}.jsonl"
