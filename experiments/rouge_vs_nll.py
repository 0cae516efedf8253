"""Why ROUGE and likelihood can disagree on a run: per user, memory against no memory.

Reads a `milp.train` run's `predictions.jsonl` (run with `compare_without_memory=true`)
and prints, per user and overall (mean over users), ROUGE-L's precision, recall and
F-measure (LaMP's tokenization, `milp.evaluation.metrics`), the answers' length in words beside the
gold's, and the gold's mean token NLL, each with memory / without. ROUGE-L F rewards
recall, so an answer half the gold's length loses F even where each of its words
matches the gold more often (higher precision); the NLL scores the gold itself and does
not depend on what the model chose to generate.

    python experiments/rouge_vs_nll.py outputs/test/shakespeare
    python experiments/rouge_vs_nll.py outputs/test/shakespeare --out experiments/results/x.md
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

from milp.evaluation.metrics import rouge_l_parts, tokenize
from milp.run.files import atomic_write_text
from milp.run.store import predictions_file

COLUMNS = ("P", "R", "F", "words", "NLL")


def user_rows(predictions: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per user: each column as (with memory, without memory), means over the user's
    scored queries; `gold words` as (gold, gold)."""
    by_user: dict[str, list[dict]] = defaultdict(list)
    for p in predictions:
        if p.get("gold") is not None:
            if p.get("prediction_no_memory") is None:
                raise SystemExit(f"query {p['id']}: no answer without memory in this run")
            by_user[p["user_id"]].append(p)
    rows = {}
    for user, queries in by_user.items():
        row = {}
        for side, key, nll in (
            (0, "prediction", "nll"),
            (1, "prediction_no_memory", "nll_no_memory"),
        ):
            parts = [rouge_l_parts(q[key], q["gold"]) for q in queries]
            values = {
                "P": mean(p for p, _, _ in parts),
                "R": mean(r for _, r, _ in parts),
                "F": mean(f for _, _, f in parts),
                "words": mean(len(tokenize(q[key])) for q in queries),
                "NLL": mean(q[nll] for q in queries if q.get(nll) is not None),
            }
            for name, value in values.items():
                row.setdefault(name, [None, None])[side] = value
        gold = mean(len(tokenize(q["gold"])) for q in queries)
        rows[user] = {k: tuple(v) for k, v in row.items()} | {"gold words": (gold, gold)}
    return rows


def table(run: Path, rows: dict[str, dict[str, tuple[float, float]]]) -> str:
    """A markdown table, one line per user and the mean over users, 'memory / none'."""
    overall = {
        name: tuple(mean(r[name][side] for r in rows.values()) for side in (0, 1))
        for name in (*COLUMNS, "gold words")
    }
    lower_nll = sum(r["NLL"][0] < r["NLL"][1] for r in rows.values())
    higher_f = sum(r["F"][0] > r["F"][1] for r in rows.values())
    higher_p = sum(r["P"][0] > r["P"][1] for r in rows.values())
    lines = [
        f"ROUGE-L and gold NLL by user, memory / no memory: `{run}`",
        "",
        "| user | ROUGE-L P | ROUGE-L R | ROUGE-L F | answer words | gold words | NLL |",
        "|---|---|---|---|---|---|---|",
    ]
    for user, r in [*rows.items(), ("**mean over users**", overall)]:
        cells = [f"{r[c][0]:.3f} / {r[c][1]:.3f}" for c in ("P", "R", "F")]
        cells += [f"{r['words'][0]:.1f} / {r['words'][1]:.1f}", f"{r['gold words'][0]:.1f}"]
        cells.append(f"{r['NLL'][0]:.3f} / {r['NLL'][1]:.3f}")
        lines.append(f"| {user} | " + " | ".join(cells) + " |")
    n = len(rows)
    lines += [
        "",
        f"Memory has the lower NLL for {lower_nll}/{n} users, the higher ROUGE-L F for "
        f"{higher_f}/{n}, the higher ROUGE-L precision for {higher_p}/{n}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a milp.train run directory")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    path = predictions_file(args.run)
    if not path.is_file():
        raise SystemExit(f"rouge_vs_nll: {path}: no predictions (not a finished milp.train run)")
    predictions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    text = table(args.run, user_rows(predictions))
    print(text, end="")
    if args.out is not None:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
