"""Text documents from files, directories, Hugging Face datasets or named corpora.

A *spec* names where the text comes from:

* a registry name (:mod:`neuroplastic.data.registry`), e.g. ``tinyshakespeare`` (one
  document), ``tinystories`` (one per story), ``gsm8k`` (question + answer), ``hellaswag``
  (context + right ending), ``mmlu`` (question, choices, answer; dev and val only),
  ``wordnet`` ("lemma (pos): gloss" lines, grouped :data:`WORDNET_LINES_PER_DOC` to a
  document), ``wikitext2`` (one per article), ``slimpajama`` (streamed); ``NAME@SPLIT`` reads
  one named split of a corpus that has them (``wikitext2@valid``); a bare name never reads
  another split in place of the missing default one;
* a text file (one document); a ``.jsonl`` file (each line's ``field``; ``field`` may join
  several with ``+``, e.g. ``question+answer``);
* a directory: every ``.txt``, ``.md`` and ``.jsonl`` file inside, recursively, in sorted order
  (hidden files and folders are skipped);
* ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face ``datasets`` dataset (hub name, a directory
  written by ``save_to_disk``, or a local folder of data files); split defaults to ``train``.

A corpus name wins over a file or folder of the same name in the working directory; write
``./NAME`` for the path. Registry corpora ignore ``field``.

Anything a user can get wrong raises :class:`~neuroplastic.errors.UserError` naming the path.
What is used but not as given (bytes that are not UTF-8, a corpus passed over for another) is a
:class:`DataWarning` saying what happened, never silent.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import re
import socket
import urllib.parse
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from neuroplastic.data import registry
from neuroplastic.errors import UserError

__all__ = [
    "TEXT_SUFFIXES", "WORDNET_LINES_PER_DOC", "DataWarning", "iter_documents", "iter_jsonl", "load_documents",
    "read_jsonl", "warn_data",
]

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
WORDNET_LINES_PER_DOC = 64
_SAMPLE = 1 << 20  # bytes looked at to tell text from binary
_EOT = "<|endoftext|>"


class DataWarning(UserWarning):
    """Data was used, but not exactly as given (undecodable bytes, a fallback source, a smaller vocabulary)."""


def warn_data(message: str, stacklevel: int = 3) -> None:
    """Emit a :class:`DataWarning` (one sentence; shown by the CLI on stderr)."""
    warnings.warn(" ".join(message.split()), DataWarning, stacklevel=stacklevel)


def _undecodable_bytes(data: bytes) -> int:
    """How many bytes of ``data`` are not part of valid UTF-8."""
    return sum(1 for c in data.decode("utf-8", "surrogateescape") if "\udc80" <= c <= "\udcff")


def _warn_replaced(path: Path, n: int) -> None:
    warn_data(
        f"{path} is not valid UTF-8: {n:,} byte{'s' if n != 1 else ''} could not be decoded and "
        f"{'were' if n != 1 else 'was'} replaced with U+FFFD (the file may be Latin-1 or cp1252); "
        f"convert it with `iconv -f latin1 -t utf-8 {path.name}` to keep those characters",
        stacklevel=4,
    )


def _decode(data: bytes, path: Path) -> str:
    """UTF-8 text of ``data``; undecodable bytes become U+FFFD with a warning naming the file and count."""
    text = data.decode("utf-8", "replace")
    if "\ufffd" in text:
        n = _undecodable_bytes(data)
        if n:
            _warn_replaced(path, n)
    return text


def load_documents(
    spec: str, *, field: str = "text", data_dir: str | None = None, max_chars: int = 0
) -> list[str]:
    """All documents of ``spec`` as a list; ``max_chars > 0`` stops (and cuts) at that total."""
    entry = _registry_entry(spec)
    streaming = entry is not None and not entry.downloadable
    if streaming and max_chars <= 0:
        raise UserError(f"{spec} is too large to load whole; set max_chars (data.max_chars) or stream it")
    docs: list[str] = []
    total = 0
    for doc in _checked(_open(spec, field, data_dir, streaming=streaming), spec):
        if max_chars > 0 and total + len(doc) >= max_chars:
            if max_chars - total > 0:
                docs.append(doc[: max_chars - total])
            break
        docs.append(doc)
        total += len(doc)
    return docs


def iter_documents(spec: str, *, field: str = "text", data_dir: str | None = None) -> Iterator[str]:
    """Documents of ``spec`` one at a time (Hugging Face datasets are streamed)."""
    return _checked(_open(spec, field, data_dir, streaming=True), spec)


# -- dispatch --------------------------------------------------------------------------------
def _registry_entry(spec: str) -> registry.CorpusEntry | None:
    parsed = registry.parse_spec(spec)
    return parsed[0] if parsed is not None else None


def _open(spec: str, field: str, data_dir: str | None, streaming: bool) -> Iterator[str]:
    """Check what can be checked now (paths, names), then return the document iterator."""
    spec = str(spec)
    if spec.startswith("hf:"):
        return _iter_hf(spec, field, streaming)
    parsed = registry.parse_spec(spec)
    if parsed is not None:
        return _iter_entry(parsed[0], data_dir, streaming, split=parsed[1])
    path = Path(spec).expanduser()
    if path.is_dir():
        return _iter_dir(path, field)
    if path.is_file():
        return _iter_file(path, field)
    if path.exists():
        raise UserError(f"{path} is neither a file nor a directory; give a text file, a .jsonl file or a directory")
    hint = ""
    close = difflib.get_close_matches(spec.lower(), list(registry.REGISTRY), n=1, cutoff=0.6)
    if close:
        hint = f" (did you mean the corpus {close[0]!r}?)"
    raise UserError(f"data source {spec!r} does not exist{hint}; give an existing file or directory, a corpus name ({', '.join(registry.REGISTRY)}) or hf:NAME")


def _checked(docs: Iterator[str], spec: str) -> Iterator[str]:
    n = 0
    for doc in docs:
        n += 1
        yield doc
    if n == 0:
        raise UserError(f"no text found in {spec}; give a source with at least one non-empty document")


# -- files -----------------------------------------------------------------------------------
def _looks_binary(sample: bytes) -> bool:
    if b"\0" in sample:
        return True
    if not sample:
        return False
    text = sample.decode("utf-8", "replace")
    bad = text.count("\ufffd") - sample.count("\ufffd".encode())
    return bad > 0.3 * len(text)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}); check that it exists and that you may read it") from e


def _read_text(path: Path, *, allow_empty: bool = False) -> str:
    """A whole text file; UserError when it is empty, binary or unreadable."""
    data = _read_bytes(path)
    if not data.strip():
        if allow_empty:
            return ""
        raise UserError(f"file {path} is empty; give a file with text in it")
    if b"\0" in data or _looks_binary(data[:_SAMPLE]):
        raise UserError(f"file {path} looks binary, not UTF-8 text; give a text file or a .jsonl file")
    return _decode(data, path).removeprefix("\ufeff")


def _iter_file(path: Path, field: str) -> Iterator[str]:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        _check_text_file(path)
        return _iter_jsonl(path, field)
    text = _read_text(path)
    return iter([text])


def _check_text_file(path: Path) -> None:
    """Eager checks for a file that is then streamed: readable, not empty, not binary."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SAMPLE)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}); check that it exists and that you may read it") from e
    if not head.strip():
        raise UserError(f"file {path} is empty; give a file with text in it")
    if _looks_binary(head):
        raise UserError(f"file {path} looks binary, not UTF-8 text; give a text file or a .jsonl file")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, decoded line) of a text file, streamed; undecodable bytes become
    U+FFFD, and reading to the end warns once with their count."""
    bad = 0
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                line = raw.decode("utf-8", "replace")
                if "\ufffd" in line:
                    bad += _undecodable_bytes(raw)
                yield n, line
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}); check that you may read it") from e
    finally:  # also when the reader stops early (max_chars): the bytes seen so far
        if bad:
            _warn_replaced(path, bad)


def iter_jsonl(
    path: str | Path, *, fix: str = "fix or remove that line", skip_damaged: bool = False
) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for each line of a JSON Lines file, streamed.

    Blank lines and a leading BOM are ignored; undecodable bytes become U+FFFD (one warning).
    A line that is not a JSON object raises :class:`UserError` naming the file and line and
    ending with ``fix``; with ``skip_damaged`` it is skipped (a log line cut by a crash).
    """
    path = Path(path)
    for n, line in _lines(path):
        line = line.strip().removeprefix("\ufeff")
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            if skip_damaged:
                continue
            raise UserError(f"{path} line {n} is not valid JSON ({e}); {fix}") from e
        if not isinstance(record, dict):
            if skip_damaged:
                continue
            raise UserError(f"{path} line {n} is not a JSON object; {fix}")
        yield n, record


def read_jsonl(path: str | Path, *, fix: str = "fix or remove that line", skip_damaged: bool = False) -> list[dict]:
    """The records of :func:`iter_jsonl` as a list."""
    return [record for _, record in iter_jsonl(path, fix=fix, skip_damaged=skip_damaged)]


def _field_text(record: dict, field: str, where: str) -> str | None:
    if field in record or "+" not in field:
        if field not in record:
            have = ", ".join(sorted(record)) or "no fields"
            raise UserError(f"{where} has no {field!r} field (it has {have}); pick the field with data.field / --field")
        return _as_text(record[field], field, where)
    parts = [_field_text(record, f, where) for f in field.split("+")]
    return "\n".join(p for p in parts if p)


def _as_text(value: Any, field: str, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise UserError(f"{where}: field {field!r} is a {type(value).__name__}, not text; pick a text field with data.field / --field")


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    for n, record in iter_jsonl(path, fix=f"each line must be an object like {{\"{field}\": \"...\"}}"):
        text = _field_text(record, field, f"{path} line {n}")
        if text and text.strip():
            yield text


def _iter_dir(path: Path, field: str) -> Iterator[str]:
    files = sorted(
        (p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()
         and not any(part.startswith(".") for part in p.relative_to(path).parts)),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise UserError(f"directory {path} has no .txt, .md or .jsonl files; put text files in it or point to another source")

    def gen() -> Iterator[str]:
        for p in files:
            if p.suffix.lower() == ".jsonl":
                try:
                    _check_text_file(p)
                except UserError:
                    if p.stat().st_size == 0:
                        continue  # an empty file in a folder is skipped, not an error
                    raise
                yield from _iter_jsonl(p, field)
            else:
                text = _read_text(p, allow_empty=True)
                if text.strip():
                    yield text

    return gen()


# -- registry corpora ------------------------------------------------------------------------
def _iter_entry(
    entry: registry.CorpusEntry, data_dir: str | None, streaming: bool, split: str | None = None
) -> Iterator[str]:
    if not entry.downloadable:
        return _iter_hf(f"hf:{entry.hf}", "text", streaming=True)
    path = registry.resolve(entry.name, data_dir, split=split)
    fmt = entry.format
    if fmt == "text":
        return iter([_read_text(path)])
    if path.is_file():
        _check_text_file(path)
    if fmt == "stories":
        return _iter_stories(path)
    if fmt == "wikitext":
        return _iter_wikitext(path)
    if fmt == "gsm8k":
        return (f"{r['question'].strip()}\n{r['answer'].strip()}" for r in _records(path))
    if fmt == "hellaswag":
        return _iter_hellaswag(path)
    if fmt == "mmlu":
        return _iter_mmlu(path)
    if fmt == "wordnet":
        return _iter_wordnet(path)
    raise UserError(f"corpus {entry.name} has an unknown format {fmt!r}; this is a bug in the registry, please report it")


def _records(path: Path) -> Iterator[dict]:
    for _, record in iter_jsonl(path, fix="the file is damaged, so fetch it again"):
        yield record


def _iter_stories(path: Path) -> Iterator[str]:
    """Stories separated by ``<|endoftext|>`` lines (TinyStories); without any, one per line."""
    with open(path, "rb") as f:
        head = f.read(_SAMPLE).decode("utf-8", "replace")
    if _EOT not in head:
        for _, line in _lines(path):
            if line.strip():
                yield line.strip()
        return
    buf: list[str] = []
    for _, line in _lines(path):
        while _EOT in line:
            before, _, line = line.partition(_EOT)
            buf.append(before)
            story = "".join(buf).strip()
            if story:
                yield story
            buf = []
        buf.append(line)
    story = "".join(buf).strip()
    if story:
        yield story


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def _iter_wikitext(path: Path) -> Iterator[str]:
    """WikiText articles: a new one starts at each top-level `` = Title = `` line."""
    buf: list[str] = []
    for _, line in _lines(path):
        if _WIKITEXT_TITLE.match(line.rstrip("\n")) and "".join(buf).strip():
            yield "".join(buf).strip()
            buf = []
        buf.append(line)
    if "".join(buf).strip():
        yield "".join(buf).strip()


def _iter_hellaswag(path: Path) -> Iterator[str]:
    for r in _records(path):
        try:
            yield f"{r['ctx'].strip()} {r['endings'][int(r['label'])].strip()}"
        except (KeyError, IndexError, TypeError, ValueError):
            continue  # test items have no label


def _iter_mmlu(path: Path) -> Iterator[str]:
    """MMLU rows as "question / A. .. D. / Answer: X" documents, from dev and val (never test)."""
    root = path if path.is_dir() else path.parent
    files = sorted(p for split in ("dev", "val") for p in (root / split).glob("*.csv"))
    if not files:
        raise UserError(f"no MMLU csv files under {root}/dev or {root}/val; fetch the corpus again")
    for p in files:
        with io.StringIO(_decode(_read_bytes(p), p), newline="") as f:
            for row in csv.reader(f):
                if len(row) >= 6:
                    q, a, b, c, d, ans = row[:6]
                    yield f"{q.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {ans.strip()}"


_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


def _iter_wordnet(path: Path) -> Iterator[str]:
    """``lemma (pos): gloss`` lines, :data:`WORDNET_LINES_PER_DOC` to a document."""
    group: list[str] = []
    for _, line in _lines(path):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 3 or not parts[2].strip():
            continue
        lemma, pos, gloss = parts
        group.append(f"{_ADJ_MARKER.sub('', lemma)} ({pos}): {gloss.strip()}")
        if len(group) == WORDNET_LINES_PER_DOC:
            yield "\n".join(group)
            group = []
    if group:
        yield "\n".join(group)


# -- Hugging Face datasets -------------------------------------------------------------------
def _parse_hf(spec: str) -> tuple[str, str | None, str]:
    rest = spec[len("hf:") :]
    split = "train"
    if "@" in rest:
        rest, split = rest.rsplit("@", 1)
    name, _, config = rest.partition(":")
    if not name or not split:
        raise UserError(f"bad Hugging Face spec {spec!r}; write hf:NAME[:CONFIG][@SPLIT], e.g. hf:roneneldan/TinyStories@validation")
    return name, config or None, split


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else type(e).__name__
    return first[:200]


_TRUE = ("1", "ON", "YES", "TRUE")
HUB_PROBE_TIMEOUT = 3.0  # seconds to open a TCP connection to the Hub before calling it unreachable


def hub_offline_reason() -> str | None:
    """Why the Hugging Face Hub cannot be used now (offline env var set, or no TCP connection to
    it within :data:`HUB_PROBE_TIMEOUT` seconds), or None when it can be tried."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"{var} is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # through a proxy: a direct probe says nothing; let the client try
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
    except OSError as e:
        return f"no connection to {host}:{port}: {e.strerror or e}"
    return None


@contextmanager
def _hub_offline(on: bool) -> Iterator[None]:
    """Make ``datasets`` / ``huggingface_hub`` work from their caches only (no retries) while on."""
    if not on:
        yield
        return
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _iter_hf(spec: str, field: str, streaming: bool) -> Iterator[str]:
    name, config, split = _parse_hf(spec)
    try:
        import datasets
    except ImportError as e:
        raise UserError("reading hf: datasets needs the `datasets` package; install it with pip install 'neuroplastic[hf]'") from e
    path = Path(name).expanduser()
    offline = None if path.exists() else hub_offline_reason()  # local data needs no Hub
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"dataset {path} has no split {split!r} (it has {', '.join(ds)}); write hf:{name}@SPLIT")
                ds = ds[split]
            if streaming:
                ds = ds.to_iterable_dataset()
        else:
            with _hub_offline(offline is not None):
                ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, hub errors)
        if offline is not None:
            raise UserError(
                f"Hugging Face dataset {name!r} is not in the local cache and the Hub cannot be reached ({offline}); "
                "connect to the network (and unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), or give a local copy: "
                "a text or .jsonl file, a folder of data files, or a save_to_disk directory"
            ) from e
        raise UserError(f"cannot load Hugging Face dataset {name!r} (config {config}, split {split!r}): {_short(e)}; check the name, config and split, or use a local copy") from e
    columns = getattr(ds, "column_names", None)
    if columns is not None and field not in columns and not all(f in columns for f in field.split("+")):
        raise UserError(f"dataset {name!r} has no {field!r} column (it has {', '.join(columns)}); pick one with data.field / --field")

    def gen() -> Iterator[str]:
        for i, row in enumerate(ds):
            text = _field_text(row, field, f"dataset {name!r} row {i}")
            if text and text.strip():
                yield text

    return gen()
