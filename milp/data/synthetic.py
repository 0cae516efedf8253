"""The embedded default data set: seeded, LaMP-4-schema news headlines by distinct writers.

Nothing can be downloaded at run time, so milp ships a generator. Every article is
built from a subject, an event (verb + object) and a place; its *neutral* headline
is "subject verb object place". Each synthetic user writes headlines their own way,
and only their history reveals how:

- vocabulary: a personal synonym for each verb ("approves" -> "greenlights");
- phrasing habits: a fixed opener ("just in :"), dropping leading articles, or putting
  the place first ("downtown : council okays budget");
- a recurring fact: the name of the outlet they write for, ending every headline.

Writers are not perfectly consistent (an opener is skipped now and then), history
sizes range from sparse (4 items) to rich (48), and every user has three later
queries. The *generic* corpus (neutral headlines, plus prose that uses the same
words) is what the tiny base model is pretrained on; it contains no user's style.

Files are written in the LaMP schema (`{split}_questions.json`, `{split}_outputs.json`
with a `user_id` per question, as in LaMP's time-based split), so the real loader
reads them; `generic_corpus.jsonl` holds the pretraining pairs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from milp.data.checks import setting_int
from milp.data.lamp import load_lamp_split
from milp.data.retrieval import RetrievalFormat
from milp.data.users import HistoryPair
from milp.run.files import publish_dir

GENERATOR_VERSION = 3
HEADLINE_PREFIX = "Generate a headline for the following article: "

SUBJECTS = [
    "the city council",
    "local farmers",
    "the football club",
    "the state university",
    "a tech startup",
    "the national museum",
    "hospital staff",
    "the school board",
    "the central bank",
    "a rock band",
    "the weather service",
    "the transit agency",
    "the mayor",
    "a bakery chain",
    "the police department",
    "the chess club",
]
VERBS = {
    "approves": ["greenlights", "okays", "backs", "endorses"],
    "opens": ["unveils", "launches", "debuts", "inaugurates"],
    "cancels": ["scraps", "axes", "drops", "shelves"],
    "wins": ["clinches", "grabs", "secures", "bags"],
    "delays": ["postpones", "stalls", "defers", "freezes"],
    "raises": ["hikes", "boosts", "lifts", "ups"],
    "hires": ["taps", "names", "recruits", "appoints"],
    "celebrates": ["marks", "toasts", "honors", "cheers"],
    "rejects": ["blocks", "refuses", "snubs", "vetoes"],
    "plans": ["eyes", "mulls", "weighs", "drafts"],
    "cuts": ["slashes", "trims", "reduces", "chops"],
    "tests": ["trials", "pilots", "probes", "checks"],
}
OBJECTS = [
    "new budget",
    "night market",
    "summer festival",
    "regional title",
    "bridge repairs",
    "ticket prices",
    "new director",
    "anniversary party",
    "parking plan",
    "school lunches",
    "water fees",
    "bike lanes",
    "solar panels",
    "library hours",
    "food trucks",
    "bus routes",
]
PLACES = [
    "in springfield",
    "in riverdale",
    "downtown",
    "near the harbor",
    "in oak valley",
    "in the old town",
    "on main street",
    "at city hall",
    "in maple grove",
    "uptown",
]
OPENERS = ["breaking :", "just in :", "update :", "watch :", "exclusive :", "big news :", ""]
OUTLETS = [
    "harbor herald",
    "valley voice",
    "daily drum",
    "metro minute",
    "town crier",
    "evening post",
    "river times",
    "the beacon",
    "morning bugle",
    "city pulse",
    "north star",
    "weekly wire",
]
FILLERS = [
    "officials said more details would follow next month .",
    "residents had asked for the change for years .",
    "critics say the decision came too late .",
    "the announcement drew a large crowd .",
    "a public meeting is planned for friday .",
    "local shops expect more visitors this season .",
    "the cost has not yet been disclosed .",
    "supporters called it a long overdue step .",
]
SPLITS = {"train": 24, "dev": 16, "test": 16}
QUERIES_PER_USER = 3
HISTORY_RANGE = (4, 48)


@dataclass(frozen=True)
class WriterStyle:
    """How one synthetic user turns a neutral headline into their own."""

    synonyms: dict[str, str]
    opener: str
    outlet: str
    drop_article: bool
    place_first: bool
    opener_rate: float = 0.9

    def headline(self, subject: str, verb: str, obj: str, place: str, rng: random.Random) -> str:
        """Write the headline of an event in this user's style."""
        if self.drop_article:
            subject = subject.removeprefix("the ").removeprefix("a ")
        verb = self.synonyms.get(verb, verb)
        core = (
            f"{place} : {subject} {verb} {obj}"
            if self.place_first
            else (f"{subject} {verb} {obj} {place}")
        )
        opener = self.opener if self.opener and rng.random() < self.opener_rate else ""
        return " ".join(part for part in (opener, core, f"| {self.outlet}") if part)


def random_style(rng: random.Random) -> WriterStyle:
    """Draw a writer: most verbs get a personal synonym, plus habits and an outlet."""
    synonyms = {verb: rng.choice(alts) for verb, alts in VERBS.items() if rng.random() < 0.85}
    return WriterStyle(
        synonyms=synonyms,
        opener=rng.choice(OPENERS),
        outlet=rng.choice(OUTLETS),
        drop_article=rng.random() < 0.5,
        place_first=rng.random() < 0.3,
    )


def random_event(rng: random.Random) -> tuple[str, str, str, str, str]:
    """An article and the facts its headline is made of: (article, subject, verb, obj, place)."""
    subject, verb = rng.choice(SUBJECTS), rng.choice(list(VERBS))
    obj, place = rng.choice(OBJECTS), rng.choice(PLACES)
    count = rng.randint(2, 90) * 10
    sentences = [
        f"{subject} {verb} {obj} {place} this week .",
        f"about {count} people are affected by the {obj} .",
        *rng.sample(FILLERS, 2),
    ]
    return " ".join(sentences), subject, verb, obj, place


def neutral_headline(subject: str, verb: str, obj: str, place: str) -> str:
    """The unpersonalized headline the base model is pretrained to write."""
    return f"{subject} {verb} {obj} {place}"


def generic_corpus(
    num_pairs: int, seed: int, styled_fraction: float = 0.4, demo_fraction: float = 0.25
) -> list[HistoryPair]:
    """Pretraining pairs with no *user's* style: article -> headline.

    Most headlines are neutral; the rest are each written by a different one-off
    writer, so the base model knows that synonyms, openers and outlet names exist (as
    any pretrained LM has seen many styles) but no style is tied to anyone: which one a
    given user uses is only in that user's history. Greedy decoding of the base model
    gives the neutral headline.

    A `demo_fraction` of the styled pairs show two earlier headlines of the same one-off
    writer in the prompt, in the retrieval-in-prompt layout (milp/data/retrieval.py), so the
    base model can learn a style in context, as real LLMs do; without this, the
    retrieval baseline would be unfairly weak on the embedded default.
    """
    rng = random.Random(f"generic-{seed}")
    layout = RetrievalFormat()
    pairs = []
    for _ in range(num_pairs):
        article, subject, verb, obj, place = random_event(rng)
        prompt = HEADLINE_PREFIX + article
        if rng.random() < styled_fraction:
            style = random_style(rng)
            headline = style.headline(subject, verb, obj, place, rng)
            if rng.random() < demo_fraction / styled_fraction:
                demos = []
                for _ in range(2):
                    demo_article, *facts = random_event(rng)
                    demos.append(HistoryPair("", style.headline(*facts, rng), demo_article))
                prompt = layout.render(demos, prompt)
        else:
            headline = neutral_headline(subject, verb, obj, place)
        pairs.append(HistoryPair(prompt, headline))
    return pairs


def _user_records(user_id: str, rng: random.Random) -> tuple[list[dict], list[dict]]:
    style = random_style(rng)
    # Log-uniform history sizes give both sparse and rich users.
    low, high = HISTORY_RANGE
    size = round(low * (high / low) ** rng.random())
    items = []
    for day in range(size + QUERIES_PER_USER):
        article, subject, verb, obj, place = random_event(rng)
        items.append((day, article, style.headline(subject, verb, obj, place, rng)))
    profile = [
        {"id": f"{user_id}-p{day}", "text": article, "title": title, "date": day}
        for day, article, title in items[:size]
    ]
    questions, golds = [], []
    for day, article, title in items[size:]:
        question_id = f"{user_id}-q{day}"
        questions.append(
            {
                "id": question_id,
                "user_id": user_id,
                "input": HEADLINE_PREFIX + article,
                "profile": profile,
            }
        )
        golds.append({"id": question_id, "output": title})
    return questions, golds


def write_synthetic_lamp(directory: str | Path, seed: int = 0, generic_pairs: int = 4000) -> Path:
    """Write the embedded data set into `directory` (atomically) and return it."""
    with publish_dir(directory, "meta.json") as staging:
        for split, num_users in SPLITS.items():
            rng = random.Random(f"users-{split}-{seed}")
            questions, golds = [], []
            for index in range(num_users):
                user_questions, user_golds = _user_records(f"{split}-u{index:03d}", rng)
                questions += user_questions
                golds += user_golds
            (staging / f"{split}_questions.json").write_text(json.dumps(questions))
            (staging / f"{split}_outputs.json").write_text(
                json.dumps({"task": "LaMP_4", "golds": golds})
            )
        with (staging / "generic_corpus.jsonl").open("w") as out:
            for pair in generic_corpus(generic_pairs, seed):
                out.write(json.dumps({"prompt": pair.prompt, "response": pair.target}) + "\n")
        (staging / "meta.json").write_text(
            json.dumps({"generator_version": GENERATOR_VERSION, "seed": seed, "task": "LaMP_4"})
        )
    return Path(directory)


def ensure_synthetic_lamp(root: str | Path, seed: int = 0) -> Path:
    """The directory of the embedded data set for `seed`, generated on first use."""
    directory = Path(root) / f"synthetic-lamp4-v{GENERATOR_VERSION}-seed{seed}"
    if not (directory / "meta.json").is_file():
        write_synthetic_lamp(directory, seed)
    return directory


def load_generic_corpus(directory: str | Path) -> list[HistoryPair]:
    """Read the generic (non-user) pretraining pairs written next to the LaMP files."""
    with (Path(directory) / "generic_corpus.jsonl").open() as lines:
        return [HistoryPair(r["prompt"], r["response"]) for r in map(json.loads, lines)]


def load_synthetic_users(
    root: str | Path,
    split: str,
    seed: int = 0,
    max_history: int | None = None,
    max_users: int | None = None,
) -> list:
    """Users of one split of the embedded data set, read through the LaMP loader."""
    # Checked before generating, not only by the loader after it.
    setting_int("data.users.max_history", max_history, 1, "all items")
    setting_int("data.users.max_users", max_users, 1, "all users")
    directory = ensure_synthetic_lamp(root, seed)
    return load_lamp_split("LaMP_4", directory, split, max_history, max_users)
