"""Many ways to ask for the same thing: the wordings of tasks and criteria in the made prompts.

A model tuned on one wording per criterion can learn the wording instead of the criterion. Every
family here has several phrasings for training and others, never used in training, for the
held-out prompts, so held-out pass rates measure whether the criterion itself was learned. Each
phrasing asks for exactly what the family's checker tests.

Placeholders: ``{n}`` (a number), ``{kw}`` (a keyword), ``{a}`` (a phrase), ``{t}`` (a topic).
"""

from __future__ import annotations

import random

from criteriapo.criteria.library import Criterion

SPLITS = ("train", "heldout")

# family -> (training phrasings, held-out phrasings)
CRITERIA: dict[str, tuple[list[str], list[str]]] = {
    "max_words": (
        [
            "Answer in at most {n} words.",
            "Use no more than {n} words.",
            "Keep your reply to {n} words or fewer.",
            "Be brief: {n} words at most.",
        ],
        ["Your whole answer must fit in {n} words.", "Don't go over {n} words."],
    ),
    "min_words": (
        ["Answer in at least {n} words.", "Write {n} words or more.", "Use no fewer than {n} words."],
        ["Make it at least {n} words long.", "Your reply should run to {n} words at minimum."],
    ),
    "max_sentences": (
        [
            "Use at most {n} sentences.",
            "Reply in no more than {n} sentences.",
            "Keep it to {n} sentences or fewer.",
        ],
        ["Say it in {n} sentences at most.", "Don't write more than {n} sentences."],
    ),
    "paragraphs": (
        [
            "Write exactly {n} paragraphs separated by blank lines.",
            "Split your reply into {n} paragraphs with a blank line between them.",
            "Use {n} paragraphs, separated by an empty line.",
        ],
        ["Organise the answer as {n} paragraphs divided by blank lines."],
    ),
    "bullets": (
        [
            "Answer with exactly {n} bullet points starting with '- '.",
            "Give exactly {n} bullet points, each starting with '- '.",
            "Use a list of exactly {n} items, each marked with '- '.",
        ],
        ["Format it as {n} bullet points (use '- ' for each), no more and no less."],
    ),
    "lowercase": (
        [
            "Write your whole reply in lowercase letters.",
            "Use only lowercase letters.",
            "No capital letters anywhere in your reply.",
        ],
        ["Don't use any uppercase letters at all.", "your entire response should be in lowercase."],
    ),
    "uppercase": (
        ["Write your whole reply in capital letters.", "Answer in all caps.", "Use only uppercase letters."],
        ["Your entire answer should be in CAPITAL letters."],
    ),
    "no_commas": (
        ["Do not use any commas.", "Avoid commas entirely.", "Write without a single comma."],
        ["Make sure there are no commas in your answer.", "Commas are not allowed."],
    ),
    "json": (
        ["Reply with valid JSON only.", "Format your entire answer as JSON.", "Output only a JSON object."],
        ["Wrap the whole response in JSON format."],
    ),
    "title": (
        [
            "Give your reply a title wrapped in double angular brackets, like <<title>>.",
            "Start with a title in double angle brackets, such as <<my title>>.",
            "Include a title written as <<title>>.",
        ],
        ["Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>."],
    ),
    "quoted": (
        [
            "Wrap your whole reply in double quotes.",
            "Put your entire answer inside double quotation marks.",
            "Enclose the whole reply in double quotes.",
        ],
        ["Surround your full response with double quotation marks."],
    ),
    "postscript": (
        [
            "End with a postscript starting with P.S.",
            "Add a postscript at the end that starts with P.S.",
            "Finish with a note that starts with P.S.",
        ],
        ["At the end of your response, please explicitly add a postscript starting with P.S."],
    ),
    "starts_with": (
        [
            "Start your reply with '{a}'.",
            "Begin your answer with the word '{a}'.",
            "Your first word must be '{a}'.",
        ],
        ["Open your response with '{a}'."],
    ),
    "ends_with": (
        [
            "End your reply with '{a}'.",
            "Finish your answer with the word '{a}'.",
            "The last word of your reply must be '{a}'.",
        ],
        ["Finish your response with this exact phrase: '{a}'. No other words should follow it."],
    ),
    "include": (
        [
            "Include the word {kw}.",
            "Use the word '{kw}' somewhere in your reply.",
            "Make sure the word {kw} appears.",
        ],
        ["Mention the keyword '{kw}' in your answer."],
    ),
    "avoid": (
        ["Do not use the word {kw}.", "Avoid the word '{kw}'.", "Never write the word {kw}."],
        ["Don't include the keyword '{kw}' in the response."],
    ),
}

TASKS: tuple[list[str], list[str]] = (
    [
        "Describe {t}.",
        "Explain why people like {t}.",
        "Give advice to someone curious about {t}.",
        "Write a short note about {t}.",
        "Tell me an interesting fact about {t}.",
        "What should I know about {t}?",
        "Write a few lines about {t}.",
    ],
    [
        "I'd love to learn something about {t}.",
        "Can you tell me what makes {t} special?",
        "Share your thoughts on {t}.",
    ],
)


def phrase_criterion(c: Criterion, split: str, rng: random.Random) -> str:
    """One wording of ``c`` from ``split``'s phrasings; families without phrasings (and keyword
    lists) keep their description."""
    family, _, arg = c.name.partition(":")
    if family not in CRITERIA or "|" in arg:
        return c.description
    template = rng.choice(CRITERIA[family][SPLITS.index(split)])
    kw = arg.split("|")[0]
    return template.format(n=arg, kw=kw, a=arg)


def phrase_task(topic: str, split: str, rng: random.Random) -> str:
    return rng.choice(TASKS[SPLITS.index(split)]).format(t=topic)


def phrase_prompt(task: str, instructions: list[str], rng: random.Random) -> str:
    """The task and its instructions, the instructions after it (or, one time in four, before it)."""
    if not instructions:
        return task
    if rng.random() < 0.25:
        return " ".join(instructions) + "\n\n" + task
    return " ".join([task, *instructions])
