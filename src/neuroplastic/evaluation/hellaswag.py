"""HellaSwag for the multiple-choice scorer: the jsonl file, lm-eval's preprocessing, items.

Each line holds ``ctx``, ``endings`` and ``label``. As in lm-eval's ``hellaswag`` task, the
query is ``"{activity_label}: {ctx}"`` (``ctx_a + " " + ctx_b.capitalize()`` when those
fields exist), and query and endings go through ``preprocess`` (strip, ``" [title]"`` ->
``". "``, drop ``[...]`` tags, ``"  "`` -> ``" "``); continuation ``" " + ending``, scored
as ``acc`` and ``acc_norm`` by :func:`~neuroplastic.evaluation.multiple_choice.score_instances`.
``preprocess=False`` scores the raw ``ctx`` and endings instead. Shots (there is no train
split here) are k other items of the same file drawn with ``seed``, each
``query + " " + gold ending``, joined by ``"\\n\\n"``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from neuroplastic.data.sources import iter_jsonl
from neuroplastic.errors import UserError
from neuroplastic.evaluation.multiple_choice import MCInstance, shot_instances

__all__ = ["hellaswag_instances", "hellaswag_query", "load_hellaswag"]


def _hellaswag_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("hellaswag_val.jsonl", "val_head500.jsonl"):
            if (path / name).is_file():
                return path / name
        files = sorted(path.glob("*.jsonl"))
        if len(files) == 1:
            return files[0]
    raise UserError(f"no HellaSwag jsonl file at {path}; give the path of the .jsonl file.")


def _label(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def load_hellaswag(path: str | Path) -> list[dict]:
    """HellaSwag items ``{"ctx", "endings", "label", "activity_label"}`` (plus ``ctx_a``,
    ``ctx_b``, ``ind`` when the file has them) from a jsonl file (or its folder)."""
    path = _hellaswag_file(Path(path))
    items: list[dict] = []
    for n, rec in iter_jsonl(path, fix="fix that line."):
        for key in ("ctx", "endings", "label"):
            if key not in rec:
                raise UserError(f"{path} line {n}: missing key {key!r}; fix that line.")
        endings = rec["endings"]
        if (
            not isinstance(endings, list)
            or len(endings) < 2
            or not all(isinstance(e, str) for e in endings)
        ):
            raise UserError(
                f"{path} line {n}: 'endings' must be a list of at least 2 strings; "
                "fix that line."
            )
        if not isinstance(rec["ctx"], str):
            raise UserError(f"{path} line {n}: 'ctx' must be a string; fix that line.")
        label = _label(rec["label"])
        if label is None or not 0 <= label < len(endings):
            raise UserError(
                f"{path} line {n}: 'label' must be an integer from 0 to "
                f"{len(endings) - 1} but is {rec['label']!r}; fix that line."
            )
        item = {
            "ctx": rec["ctx"],
            "endings": list(endings),
            "label": label,
            "activity_label": str(rec.get("activity_label") or ""),
        }
        for key in ("ctx_a", "ctx_b", "ind"):
            if key in rec:
                item[key] = rec[key]
        items.append(item)
    if not items:
        raise UserError(f"{path} holds no HellaSwag items.")
    return items


def _hs_clean(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess``."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_query(item: dict, preprocess: bool = True) -> tuple[str, list[str]]:
    """``(query, endings)`` of a HellaSwag item as lm-eval's ``hellaswag`` task builds them
    (``preprocess=False``: the raw ``ctx`` and endings)."""
    if not preprocess:
        return item["ctx"], list(item["endings"])
    if isinstance(item.get("ctx_a"), str) and isinstance(item.get("ctx_b"), str):
        ctx = item["ctx_a"] + " " + item["ctx_b"].capitalize()
    else:
        ctx = item["ctx"]
    label = item.get("activity_label") or ""
    query = _hs_clean(f"{label}: {ctx}" if label else ctx)
    return query, [_hs_clean(e) for e in item["endings"]]


def hellaswag_instances(
    path: Path, *, limit: int | None = None, shots: int = 0, seed: int = 0, preprocess: bool = True
) -> list[MCInstance]:
    """The HellaSwag items of ``path`` as :class:`MCInstance` s (see the module docs)."""
    items = load_hellaswag(path)
    return shot_instances(
        [hellaswag_query(it, preprocess) for it in items],
        [it["label"] for it in items],
        [None] * len(items),
        [{"ctx": it["ctx"]} for it in items],
        limit=limit, shots=shots, seed=seed,
    )
