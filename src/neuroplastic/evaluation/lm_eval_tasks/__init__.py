"""lm-evaluation-harness task configs that read local files, never a hub.

``hellaswag``, ``mmlu`` (a group of the 57 ``mmlu_<subject>`` tasks) and ``gsm8k`` with
the prompts, choices and metrics of lm-eval's own tasks of those names, but their data
comes from the project's data registry (:func:`neuroplastic.data.registry.find_local`:
``--metadata '{"data_dir": ...}'``, ``$NEUROPLASTIC_DATA``, ``../shared/data``, the
download cache) through lm-eval's ``custom_dataset`` hook. Pass :data:`TASKS_DIR` as
lm-eval's ``--include_path`` (``python -m neuroplastic.evaluation.lm_eval_adapter`` does
it for you): tasks found there replace the built-in ones of the same name.

* ``hellaswag``: the local validation jsonl (``hellaswag/hellaswag_val.jsonl`` or the
  500-item ``val_head500.jsonl``), preprocessed as lm-eval does (with ``ctx`` when the
  file has no ``ctx_a`` / ``ctx_b``).
* ``mmlu_<subject>``: the ``val`` split is evaluated (MMLU's test split is not shipped
  locally), ``dev`` gives the few-shot examples (``first_n``, as lm-eval).
* ``gsm8k``: ``gsm8k/test.jsonl`` when a data dir has it; otherwise the held-out part of
  the local train file -- the same examples ``neuroplastic-cot`` holds out
  (:func:`~neuroplastic.data.cot.split_examples`, 5 %, seed 0) -- with the rest as the
  few-shot pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuroplastic.errors import UserError

TASKS_DIR = Path(__file__).resolve().parent

__all__ = ["TASKS_DIR", "gsm8k_dataset", "hellaswag_dataset", "mmlu_dataset", "process_hellaswag"]


def _datasets():
    import datasets

    return datasets


def _local(name: str, data_dir: Any) -> Path:
    from neuroplastic.data.registry import data_dirs, find_local

    found = find_local(name, data_dir or None)
    if found is None:
        dirs = ", ".join(str(d) for d in data_dirs(data_dir or None))
        raise UserError(
            f"no local copy of {name} in the data dirs ({dirs}); set NEUROPLASTIC_DATA or pass "
            "--metadata '{\"data_dir\": \"DIR\"}' to lm_eval."
        )
    return found


def hellaswag_dataset(data_dir: str | None = None, **_: Any):
    """``DatasetDict(validation=...)`` of the local HellaSwag file."""
    from neuroplastic.evaluation.hellaswag import load_hellaswag

    items = load_hellaswag(_local("hellaswag", data_dir))
    rows = [
        {
            "ind": it.get("ind", i),
            "activity_label": it["activity_label"],
            "ctx": it["ctx"],
            "ctx_a": it.get("ctx_a") or "",
            "ctx_b": it.get("ctx_b") or "",
            "endings": it["endings"],
            "label": str(it["label"]),
        }
        for i, it in enumerate(items)
    ]
    ds = _datasets()
    return ds.DatasetDict({"validation": ds.Dataset.from_list(rows)})


def process_hellaswag(dataset):
    """lm-eval's HellaSwag ``process_docs`` (query, choices, gold), on our fields."""
    from neuroplastic.evaluation.hellaswag import hellaswag_query

    def one(doc: dict) -> dict:
        item = dict(doc)
        if not (item.get("ctx_a") or item.get("ctx_b")):
            item.pop("ctx_a", None)
            item.pop("ctx_b", None)
        query, choices = hellaswag_query(item)
        return {"query": query, "choices": choices, "gold": int(doc["label"])}

    return dataset.map(one)


def mmlu_dataset(subject: str, data_dir: str | None = None, **_: Any):
    """``DatasetDict(validation=val rows, dev=dev rows)`` of one MMLU subject, with
    lm-eval's fields (``question``, ``choices``, ``answer`` 0-3, ``subject``)."""
    from neuroplastic.evaluation.mmlu import load_mmlu

    root = _local("mmlu", data_dir)
    ds = _datasets()
    out = {}
    for split, key in (("val", "validation"), ("dev", "dev")):
        items = load_mmlu(root, split, [subject])[subject]
        out[key] = ds.Dataset.from_list([
            {"question": it["question"], "choices": it["options"], "answer": it["answer"],
             "subject": subject}
            for it in items
        ])
    return ds.DatasetDict(out)


def gsm8k_dataset(data_dir: str | None = None, **_: Any):
    """``DatasetDict(train=..., test=...)``: the local test file, else the held-out part of
    the train file (see the module docs)."""
    from neuroplastic.data.cot import split_examples
    from neuroplastic.data.registry import data_dirs
    from neuroplastic.data.sources import iter_jsonl

    train_path = _local("gsm8k", data_dir)

    def rows(path: Path) -> list[dict]:
        out = []
        for n, rec in iter_jsonl(path, fix="fix that line."):
            if not isinstance(rec.get("question"), str) or not isinstance(rec.get("answer"), str):
                raise UserError(f"{path} line {n}: not a GSM8K record (it needs the text fields "
                                "'question' and 'answer'); fix that line.")
            out.append({"question": rec["question"], "answer": rec["answer"]})
        return out

    train = rows(train_path)
    test_file = next((d / "gsm8k" / "test.jsonl" for d in data_dirs(data_dir or None)
                      if (d / "gsm8k" / "test.jsonl").is_file()), None)
    if test_file is not None:
        test = rows(test_file)
    else:
        from neuroplastic.data.cot import CotExample

        examples = [CotExample(r["question"], r["answer"], None, "gsm8k") for r in train]
        kept, held = split_examples(examples, 0.05, 0)
        train = [{"question": e.question, "answer": e.answer} for e in kept]
        test = [{"question": e.question, "answer": e.answer} for e in held]
    ds = _datasets()
    return ds.DatasetDict({"train": ds.Dataset.from_list(train), "test": ds.Dataset.from_list(test)})
