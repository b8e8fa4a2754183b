"""Write a benchmark's results into its marked section of a Markdown file (docs/BENCHMARKS.md).

A section is the text between ``<!-- begin:NAME -->`` and ``<!-- end:NAME -->``; a part is a
block inside a section between ``<!-- begin:NAME/PART -->`` and ``<!-- end:NAME/PART -->``.
Everything outside the markers is kept. Not a benchmark: ``run_all.py`` skips ``_`` files.
"""

from __future__ import annotations

from pathlib import Path


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- begin:{name} -->", f"<!-- end:{name} -->"


def _read(doc: Path, title: str) -> str:
    return doc.read_text(encoding="utf-8") if doc.exists() else f"{title}\n"


def _write(doc: Path, text: str) -> None:
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text, encoding="utf-8")


def read_section(doc: Path, name: str) -> str | None:
    """The text between the markers of section ``name`` of ``doc`` (``None`` if absent)."""
    text = _read(Path(doc), "")
    begin, end = _markers(name)
    if begin not in text or end not in text:
        return None
    a = text.index(begin) + len(begin) + 1
    return text[a : text.index(end)]


def write_section(doc: Path, name: str, body: str, title: str = "# Benchmarks") -> None:
    """Replace section ``name`` of ``doc`` with ``body`` (or append it; a new file gets ``title``)."""
    doc = Path(doc)
    text = _read(doc, title)
    begin, end = _markers(name)
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    if begin in text and end in text:
        a, b = text.index(begin), text.index(end) + len(end)
        if text[b : b + 1] == "\n":
            b += 1
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    _write(doc, text)


def write_part(doc: Path, name: str, part: str, body: str, intro: str = "", title: str = "# Benchmarks") -> None:
    """Replace (or append) ``part`` inside section ``name`` of ``doc``; a new section starts with ``intro``."""
    doc = Path(doc)
    text = _read(doc, title)
    begin, end = _markers(name)
    pb, pe = _markers(f"{name}/{part}")
    block = f"{pb}\n{body}{pe}\n"
    if begin not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n{begin}\n{intro}{end}\n"
    a, b = text.index(begin), text.index(end)
    section = text[a:b]
    if pb in section and pe in section:
        i, j = section.index(pb), section.index(pe) + len(pe) + 1
        section = section[:i] + block + section[j:]
    else:
        section = section + block
    _write(doc, text[:a] + section + text[b:])
