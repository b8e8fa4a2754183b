"""MMLU for the multiple-choice scorer: the csv files, lm-eval's prompt, few-shot examples.

Files: csv, no header (question, A, B, C, D, answer letter), one per subject and split,
``<subject>_<split>.csv``. The prompt is lm-eval's ``mmlu``: ``"The following are multiple
choice questions (with answers) about {subject}.\\n\\n"`` then the k shots, each
``"{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: {letter}"`` followed by
``"\\n\\n"``, then the question ending ``"Answer:"``; continuations ``" A"`` .. ``" D"``.
Shots are the first k rows of the subject's ``dev`` split (lm-eval's ``first_n``).
``limit`` counts items in total, taken round-robin over the subjects (the first items of
every subject); ``limit_per_subject`` is lm-eval's ``--limit`` for each MMLU subtask.
"""

from __future__ import annotations

import csv
import difflib
import re
from collections.abc import Sequence
from pathlib import Path

from neuroplastic.errors import UserError
from neuroplastic.evaluation.multiple_choice import MCInstance

__all__ = ["LETTERS", "load_mmlu", "mmlu_instances", "mmlu_prompt"]

LETTERS = "ABCD"
_SPLIT_SUFFIX = re.compile(r"_(dev|val|test|train|auxiliary_train)$")


def _mmlu_files(path: Path, split: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"MMLU data {path} does not exist; give the mmlu folder or a csv file.")
    for d in (path / split, path):
        files = sorted(d.glob(f"*_{split}.csv"))
        if files:
            return files
    raise UserError(
        f"no MMLU files *_{split}.csv in {path} or {path / split}; check the folder and the split."
    )


def _mmlu_subject(path: Path) -> str:
    return _SPLIT_SUFFIX.sub("", path.stem)


def _read_mmlu_csv(path: Path, subject: str) -> list[dict]:
    items: list[dict] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            line = 1
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    raise UserError(f"{path} line {line}: not valid csv ({e}); fix that row.") from e
                start, line = line, reader.line_num + 1
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line
                if len(row) != 6:
                    raise UserError(
                        f"{path} line {start}: expected 6 columns (question, A, B, C, D, "
                        f"answer letter) but found {len(row)}; fix that row."
                    )
                answer = row[5].strip().upper()
                if len(answer) != 1 or answer not in LETTERS:
                    raise UserError(
                        f"{path} line {start}: the answer must be one of A, B, C, D but is "
                        f"{row[5]!r}; fix that row."
                    )
                items.append(
                    {
                        "question": row[0],
                        "options": list(row[1:5]),
                        "answer": LETTERS.index(answer),
                        "subject": subject,
                    }
                )
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e}); re-save it as UTF-8.") from e
    except OSError as e:
        raise UserError(f"cannot read {path} ({e}).") from e
    if not items:
        raise UserError(f"{path} holds no MMLU rows; delete it or fill it in.")
    return items


def load_mmlu(
    path_or_dir: str | Path, split: str = "val", subjects: Sequence[str] | None = None
) -> dict[str, list[dict]]:
    """MMLU items by subject, from a csv file, a folder of ``<subject>_<split>.csv`` or
    the mmlu folder holding ``<split>/``. Items: ``{"question", "options" (4), "answer"
    (0-3), "subject"}``. ``subjects`` keeps only those (an unknown one is an error)."""
    files = _mmlu_files(Path(path_or_dir), split)
    by_subject = {_mmlu_subject(p): p for p in files}
    if subjects is not None:
        missing = [s for s in subjects if s not in by_subject]
        if missing:
            close = difflib.get_close_matches(missing[0], list(by_subject), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else (
                f"known subjects: {', '.join(sorted(by_subject))}"
            )
            raise UserError(f"no MMLU subject {missing[0]!r} in {path_or_dir} ({split}); {hint}")
        by_subject = {s: by_subject[s] for s in subjects}
    return {s: _read_mmlu_csv(p, s) for s, p in by_subject.items()}


def _mmlu_question(item: dict) -> str:
    lines = [item["question"].strip()]
    lines += [f"{letter}. {opt}" for letter, opt in zip(LETTERS, item["options"])]
    return "\n".join(lines) + "\nAnswer:"


def _mmlu_header(item: dict) -> str:
    subject = item["subject"].replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def _mmlu_shot(shot: dict) -> str:
    return f"{_mmlu_question(shot)} {LETTERS[shot['answer']]}\n\n"


def mmlu_prompt(item: dict, shots: Sequence[dict] = ()) -> str:
    """lm-eval's MMLU context for ``item`` after the few-shot ``shots`` (dev items)."""
    return _mmlu_header(item) + "".join(_mmlu_shot(s) for s in shots) + _mmlu_question(item)


def _mmlu_dev(path: Path, subject: str) -> list[dict]:
    root = path if path.is_dir() else path.parent
    for d in (root / "dev", root.parent / "dev", root):
        f = d / f"{subject}_dev.csv"
        if f.is_file():
            return _read_mmlu_csv(f, subject)
    raise UserError(
        f"few-shot MMLU needs the dev split, but there is no {subject}_dev.csv near {path}; "
        "add the dev folder or use 0 shots."
    )


def mmlu_instances(
    path: Path,
    *,
    split: str = "val",
    subjects: Sequence[str] | None = None,
    limit: int | None = None,
    limit_per_subject: int | None = None,
    shots: int = 0,
) -> list[MCInstance]:
    """The MMLU items under ``path`` as :class:`MCInstance` s, ``shots`` dev examples each
    (``limit``: round-robin over the subjects; ``limit_per_subject``: per subject)."""
    out: list[MCInstance] = []
    by_subject = {
        s: items[:limit_per_subject] for s, items in load_mmlu(path, split, subjects).items()
    }
    if limit is not None:  # round-robin: the first items of every subject
        order = [
            (s, j)
            for j in range(max((len(v) for v in by_subject.values()), default=0))
            for s in by_subject
            if j < len(by_subject[s])
        ][:limit]
        keep = {s: sorted(j for t, j in order if t == s) for s in by_subject}
        by_subject = {s: [by_subject[s][j] for j in keep[s]] for s in by_subject if keep[s]}
    for subject, items in by_subject.items():
        dev = _mmlu_dev(path, subject) if shots else []
        if shots > len(dev):
            raise UserError(
                f"MMLU subject {subject} has only {len(dev)} dev examples for few-shot; "
                f"use {len(dev)} shots or fewer."
            )
        for item in items:
            shot_texts = [_mmlu_shot(d) for d in dev[:shots]]
            out.append(
                MCInstance(
                    context=mmlu_prompt(item, dev[:shots]),
                    continuations=[f" {letter}" for letter in LETTERS[: len(item["options"])]],
                    gold=item["answer"],
                    subject=subject,
                    record={"subject": subject, "question": item["question"]},
                    header=_mmlu_header(item),
                    shots=shot_texts,
                    query=_mmlu_question(item),
                )
            )
    return out
