"""Named public corpora: where they live online, how to check them, where to find them locally.

Lookup (:func:`data_dirs`): the ``data_dir`` argument, env ``NEUROPLASTIC_DATA`` (one or more
directories, ``os.pathsep``-separated), ``../shared/data`` relative to the working directory,
``<repo root>/../shared/data``, and last the download cache (env ``NEUROPLASTIC_CACHE``, else
``~/.cache/neuroplastic``). A local copy is always used before anything is downloaded; set
``NEUROPLASTIC_OFFLINE=1`` to forbid downloads altogether.

Splits. A corpus with ``CorpusEntry.splits`` (WikiText) is read whole by its bare name only
from its default (training) files, never from another split in their place; ``NAME@SPLIT``
(``wikitext2@valid``) reads one named split. :func:`local_files` lists every file/split found.

Checksums. ``CorpusEntry.sha256`` is the sha256 of the file at ``url`` and is given only where
it is known for certain (the upstream bytes are exactly the copy in the workplace's shared data
folder, pinned to a commit). Where it is ``None`` the download is verified only by size (when
``size_bytes`` is known) and format (an archive opens, the expected files are in it, text is
not binary). ``CorpusEntry.local_sha256`` records the sha256 of the local copies we know of
(from the shared folder's ``MANIFEST.sha256``), which may be slices or conversions of the
upstream file (see ``note``); a directory's value is the sha256 of its manifest (lines
``"<sha256>  <path relative to the directory>\\n"``, sorted by path), see :func:`sha256_of`.
"""

from __future__ import annotations

import difflib
import hashlib
import http.client
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from neuroplastic.errors import UserError

__all__ = [
    "REGISTRY",
    "CorpusEntry",
    "cache_dir",
    "data_dirs",
    "find_local",
    "get_entry",
    "local_files",
    "parse_spec",
    "resolve",
    "sha256_of",
    "status",
    "wordnet_definitions",
]

_REPO_ROOT = Path(__file__).resolve().parents[3]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class CorpusEntry:
    """One named corpus.

    ``paths`` are the places (relative to a data dir) where a local copy may be, best first;
    ``paths[0]`` is what a download produces. ``download_to`` is where the downloaded file is
    stored when it is an archive, from which ``members`` are extracted: pairs of (member name,
    local path), where a member ending in ``/`` maps every file under that folder.
    """

    name: str
    description: str
    url: str  # canonical public address (a download URL, or a dataset page when stream-only)
    sha256: str | None  # of the file downloaded from url; None: not known for certain
    paths: tuple[str, ...]  # () means stream-only (through ``hf``)
    format: str  # how sources.py turns it into documents
    license: str
    download_to: str | None = None
    members: tuple[tuple[str, str], ...] = ()
    postprocess: str | None = None  # a conversion run after extraction ("wordnet-definitions")
    size_bytes: int | None = None  # size of paths[0] after a download, when known for certain
    local_sha256: dict[str, str] = field(default_factory=dict)
    hf: str | None = None  # Hugging Face dataset as NAME[:CONFIG], for "hf:" specs / streaming
    note: str = ""
    # named parts a user can pick with NAME@SPLIT: (split, candidate paths best first); a bare NAME
    # reads ``paths`` (the first split's files), never another split in its place
    splits: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def downloadable(self) -> bool:
        return bool(self.paths)


_ENTRIES = [
    CorpusEntry(
        name="tinyshakespeare",
        description="Shakespeare's plays, 1.1 MB of plain text (the char-rnn / nanoGPT corpus)",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        paths=("tinyshakespeare/input.txt",),
        format="text",
        license="public domain text (char-rnn repository: MIT)",
        size_bytes=1_115_394,
        local_sha256={"tinyshakespeare/input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"},
        note="the shared copy is the upstream file at the pinned commit, byte for byte",
    ),
    CorpusEntry(
        name="tinystories",
        description="TinyStories (Eldan & Li 2023), short stories in simple English; validation text",
        url="https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt",
        sha256=None,
        paths=("tinystories/TinyStories-valid.txt", "tinystories/valid_slice.txt"),
        format="stories",
        license="CDLA-Sharing-1.0",
        local_sha256={"tinystories/valid_slice.txt": "3ccdd4ecfe9b52fed5931479dc95ca56ce9fe44e3347cdf0daf401b3729d761c"},
        hf="roneneldan/TinyStories",
        note="valid_slice.txt is a 30 KB slice (one story a line) from a mirror, not the upstream "
        "file; the full training set streams as hf:roneneldan/TinyStories",
    ),
    CorpusEntry(
        name="wikitext2",
        description="WikiText-2 (raw), 2M tokens of good and featured Wikipedia articles",
        url="https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip",
        sha256=None,
        paths=("wikitext2/wiki.train.raw",),
        format="wikitext",
        license="CC BY-SA 3.0",
        download_to="wikitext2/wikitext-2-raw-v1.zip",
        members=(("wikitext-2-raw/", "wikitext2/"),),
        hf="Salesforce/wikitext:wikitext-2-raw-v1",
        splits=(
            ("train", ("wikitext2/wiki.train.raw", "wikitext2/wiki.train.tokens")),
            ("valid", ("wikitext2/wiki.valid.raw", "wikitext2/wiki.valid.tokens")),
            ("test", ("wikitext2/wiki.test.raw", "wikitext2/wiki.test.tokens")),
        ),
        note="the shared copy holds only the validation split, tokenized (wiki.valid.tokens, with <unk>); "
        "read it with the spec wikitext2@valid",
    ),
    CorpusEntry(
        name="wikitext103",
        description="WikiText-103 (raw), 103M tokens of good and featured Wikipedia articles",
        url="https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip",
        sha256=None,
        paths=("wikitext103/wiki.train.raw",),
        format="wikitext",
        license="CC BY-SA 3.0",
        download_to="wikitext103/wikitext-103-raw-v1.zip",
        members=(("wikitext-103-raw/", "wikitext103/"),),
        hf="Salesforce/wikitext:wikitext-103-raw-v1",
        splits=(
            ("train", ("wikitext103/wiki.train.raw", "wikitext103/wiki.train.tokens")),
            ("valid", ("wikitext103/wiki.valid.raw", "wikitext103/wiki.valid.tokens")),
            ("test", ("wikitext103/wiki.test.raw", "wikitext103/wiki.test.tokens")),
        ),
    ),
    CorpusEntry(
        name="enwik8",
        description="enwik8, the first 10^8 bytes of an English Wikipedia XML dump (Hutter Prize)",
        url="http://mattmahoney.net/dc/enwik8.zip",
        sha256=None,
        paths=("enwik8/enwik8",),
        format="text",
        license="Wikipedia text: CC BY-SA / GFDL",
        download_to="enwik8/enwik8.zip",
        members=(("enwik8", "enwik8/enwik8"),),
        size_bytes=100_000_000,
    ),
    CorpusEntry(
        name="gsm8k",
        description="GSM8K grade-school math word problems with step-by-step answers (train, 7,473)",
        url="https://raw.githubusercontent.com/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/train.jsonl",
        sha256="17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
        paths=("gsm8k/train.jsonl",),
        format="gsm8k",
        license="MIT",
        size_bytes=4_166_206,
        local_sha256={"gsm8k/train.jsonl": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"},
        hf="openai/gsm8k:main",
        note="the shared copy is the upstream file at the pinned commit, byte for byte",
    ),
    CorpusEntry(
        name="hellaswag",
        description="HellaSwag commonsense sentence completion, validation set (4 endings per item)",
        url="https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
        sha256=None,
        paths=("hellaswag/hellaswag_val.jsonl", "hellaswag/val_head500.jsonl"),
        format="hellaswag",
        license="MIT",
        local_sha256={"hellaswag/val_head500.jsonl": "aaa25c4ec6c6766a6072a1c7afe646166493051a8eccfc83eaf077fcab683aad"},
        hf="Rowan/hellaswag",
        note="val_head500.jsonl holds the first 500 validation items converted from another "
        "release (klosax/hellaswag_text_data); same fields as the official jsonl",
    ),
    CorpusEntry(
        name="mmlu",
        description="MMLU, 57-subject multiple-choice exam questions (dev, val and test csv)",
        url="https://people.eecs.berkeley.edu/~hendrycks/data.tar",
        sha256=None,
        paths=("mmlu",),
        format="mmlu",
        license="MIT",
        download_to="mmlu/data.tar",
        members=(("data/dev/", "mmlu/dev/"), ("data/val/", "mmlu/val/"), ("data/test/", "mmlu/test/")),
        local_sha256={
            "mmlu/dev": "2f340d07c19d2b5981a059f85e836d4871e338e095a04b6c757177ae27b9360d",
            "mmlu/val": "0df8d7ba127c7bbc1d50e03fe9b2af0007ef4ede7f63539788d88624b3fc1820",
        },
        hf="cais/mmlu:all",
        note="the shared copy holds dev and val, upstream bytes from hendrycks/test @ 785eba57",
    ),
    CorpusEntry(
        name="wordnet",
        description="WordNet 3.0 definitions, one 'lemma, part of speech, gloss' line per synset (117,659)",
        url="https://wordnetcode.princeton.edu/3.0/WordNet-3.0.tar.gz",
        sha256=None,
        paths=("wordnet/definitions.tsv",),
        format="wordnet",
        license="WordNet 3.0 license (free use with the copyright notice kept)",
        download_to="wordnet/WordNet-3.0.tar.gz",
        members=(("WordNet-3.0/dict/", "wordnet/dict/"),),
        postprocess="wordnet-definitions",
        local_sha256={"wordnet/definitions.tsv": "4912894f7816472dd0e61cfedd680014d31bf710886cfd201cffa6af8d281821"},
        note="definitions.tsv is derived from dict/data.{noun,verb,adj,adv} by wordnet_definitions()",
    ),
    CorpusEntry(
        name="slimpajama",
        description="SlimPajama-627B, deduplicated web/books/code/papers pretraining text (streamed)",
        url="https://huggingface.co/datasets/cerebras/SlimPajama-627B",
        sha256=None,
        paths=(),
        format="hf",
        license="mixed: each source's license applies (see the dataset card)",
        hf="cerebras/SlimPajama-627B",
        note="too large to download whole; read it with hf:cerebras/SlimPajama-627B (streaming)",
    ),
]

REGISTRY: dict[str, CorpusEntry] = {e.name: e for e in _ENTRIES}


# -- where things are ------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where downloads go: env ``NEUROPLASTIC_CACHE``, else ``~/.cache/neuroplastic``."""
    env = os.environ.get("NEUROPLASTIC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "neuroplastic"


def data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for local copies, in order; the cache dir is always last."""
    candidates: list[Path] = []
    if data_dir is not None and str(data_dir) != "":
        given = Path(data_dir).expanduser()
        if not given.is_dir():
            raise UserError(f"data dir {given} does not exist; create it or pass another --data-dir")
        candidates.append(given)
    for part in os.environ.get("NEUROPLASTIC_DATA", "").split(os.pathsep):
        if part:
            candidates.append(Path(part).expanduser())
    candidates.append(Path.cwd() / ".." / "shared" / "data")
    candidates.append(_REPO_ROOT / ".." / "shared" / "data")
    out: list[Path] = []
    seen: set[Path] = set()
    for p in candidates:
        if p.is_dir() and p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p.resolve())
    cache = cache_dir()
    if cache.resolve() not in seen:
        out.append(cache.resolve() if cache.exists() else cache)
    return out


def get_entry(name: str) -> CorpusEntry:
    """The registry entry called ``name`` (case-insensitive), or a UserError naming close ones."""
    entry = REGISTRY.get(name) or REGISTRY.get(_norm_name(name))
    if entry is None:
        close = difflib.get_close_matches(_norm_name(name), list(REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known names: {', '.join(sorted(REGISTRY))}"
        raise UserError(f"unknown corpus {name!r}; {hint}")
    return entry


def _present(path: Path) -> bool:
    if path.is_file():
        return path.stat().st_size > 0
    return path.is_dir() and any(path.iterdir())


def parse_spec(spec: str) -> tuple[CorpusEntry, str | None] | None:
    """``NAME`` or ``NAME@SPLIT`` of a registry corpus as (entry, split), else None (a path, hf:...)."""
    spec = str(spec)
    if spec.startswith("hf:") or any(c in spec for c in "/\\."):
        return None  # a path (corpus names have no dots or slashes)
    name, at, split = spec.partition("@")
    try:
        entry = get_entry(name)
    except UserError:
        return None
    if not at:
        return entry, None
    _split_paths(entry, split)  # an unknown split is an error now
    return entry, split


def _split_paths(entry: CorpusEntry, split: str | None) -> tuple[str, ...]:
    """Relative paths that hold ``split`` of ``entry`` (None: the default one), best first."""
    if split is None:
        first = entry.splits[0][1] if entry.splits else ()
        return entry.paths + tuple(p for p in first if p not in entry.paths)
    for name, rels in entry.splits:
        if name == split:
            return rels
    if entry.splits:
        have = ", ".join(f"{entry.name}@{n}" for n, _ in entry.splits)
        raise UserError(f"corpus {entry.name} has no split {split!r}; use one of {have}")
    raise UserError(f"corpus {entry.name} has no named splits; write {entry.name} without @{split}")


def find_local(name: str, data_dir: str | os.PathLike | None = None, split: str | None = None) -> Path | None:
    """The best local copy of a corpus (first of its paths found in any data dir), or None.

    ``split`` picks a named split (``entry.splits``); None is the default one (``paths``)."""
    entry = get_entry(name)
    dirs = data_dirs(data_dir)
    for rel in _split_paths(entry, split):
        for d in dirs:
            if _present(d / rel):
                return d / rel
    return None


def local_files(name: str, data_dir: str | os.PathLike | None = None) -> list[tuple[str | None, Path]]:
    """Every local file of a corpus as (split or None, path): for a corpus with named splits the
    best copy of each split found; otherwise each of ``paths`` found (the first data dir wins)."""
    entry = get_entry(name)
    dirs = data_dirs(data_dir)
    groups = [(n, rels) for n, rels in entry.splits] if entry.splits else [(None, (rel,)) for rel in entry.paths]
    found: list[tuple[str | None, Path]] = []
    for split, rels in groups:
        hit = next((d / rel for rel in rels for d in dirs if _present(d / rel)), None)
        if hit is not None:
            found.append((split, hit))
    return found


# -- checksums -------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file; of a directory, sha256 of its sorted ``"<sha256>  <relpath>\\n"`` lines."""
    path = Path(path)
    if path.is_file():
        return _sha256_file(path)
    lines = sorted(
        (p.relative_to(path).as_posix(), _sha256_file(p)) for p in path.rglob("*") if p.is_file()
    )
    return hashlib.sha256("".join(f"{h}  {rel}\n" for rel, h in lines).encode()).hexdigest()


# -- downloads -------------------------------------------------------------------------------
def resolve(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = True, split: str | None = None
) -> Path:
    """Path of a local copy of ``name`` (its ``split``), downloading it into the cache when there is none."""
    entry = get_entry(name)
    local = find_local(entry.name, data_dir, split)
    if local is not None:
        return local
    if not entry.downloadable:
        raise UserError(f"{entry.name} is only streamed, never downloaded whole; use the data spec 'hf:{entry.hf}'")
    searched = ", ".join(str(d) for d in data_dirs(data_dir))
    want = _split_paths(entry, split)[0]
    label = entry.name if split is None else f"{entry.name}@{split}"
    others = [s for s, _ in local_files(entry.name, data_dir) if s is not None and s != (split or entry.splits[0][0])]
    also = f" (its {', '.join(others)} split is here: use {entry.name}@{others[0]})" if others else ""
    offline = os.environ.get("NEUROPLASTIC_OFFLINE", "") not in ("", "0")
    if not download or offline:
        how = " or unset NEUROPLASTIC_OFFLINE to download it" if offline and download else ""
        raise UserError(f"{label} is not in any data dir ({searched}){also} and downloads are off; put {want} under one of them{how}")
    try:
        main = _fetch(entry, cache_dir())
    except UserError as e:
        if also:
            raise UserError(f"{label} is not in any data dir ({searched}){also}, and {e}") from e
        raise
    if split is None:
        return main
    got = find_local(entry.name, data_dir, split)
    if got is None:
        raise UserError(f"the download of {entry.name} from {entry.url} has no {split} split ({want}); place a copy in a data dir by hand")
    return got


def _fetch(entry: CorpusEntry, root: Path) -> Path:
    target = root / (entry.download_to or entry.paths[0])
    if not target.is_file():  # an archive downloaded before was verified before it was kept
        _download(entry, target)
    if entry.members:
        _extract(entry, target, root)
    if entry.postprocess == "wordnet-definitions":
        wordnet_definitions(root / "wordnet" / "dict", root / entry.paths[0])
    main = root / entry.paths[0]
    if not _present(main):
        raise UserError(f"the download of {entry.name} from {entry.url} did not contain {entry.paths[0]}; the file may have changed upstream, so place a copy in a data dir by hand")
    problem = _format_problem(entry, main)
    if problem:
        main.unlink(missing_ok=True)
        if entry.download_to:
            (root / entry.download_to).unlink(missing_ok=True)
        raise UserError(f"{entry.name} from {entry.url} {problem}, so it was deleted; try again or place a good copy in a data dir")
    return main


def _format_problem(entry: CorpusEntry, main: Path) -> str | None:
    """Why a downloaded file is not what the entry expects (size, binary, not jsonl), or None."""
    if not main.is_file():
        return None
    size = main.stat().st_size
    if entry.size_bytes is not None and size != entry.size_bytes:
        return f"has {size} bytes instead of {entry.size_bytes}"
    with open(main, "rb") as f:
        head = f.read(1 << 16)
    if b"\0" in head:
        return "is binary, not text"
    if entry.format in ("gsm8k", "hellaswag"):
        first = head.split(b"\n", 1)[0]
        try:
            ok = isinstance(json.loads(first), dict)
        except ValueError:
            ok = False
        if not ok:
            return "does not start with a JSON object line"
    return None


def _download(entry: CorpusEntry, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        request = urllib.request.Request(entry.url, headers={"User-Agent": "neuroplastic"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=60) as response:
            while chunk := response.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise UserError(f"could not download {entry.name} from {entry.url} ({reason}); check the network, or place {entry.paths[0]} in a data dir (NEUROPLASTIC_DATA)") from e
    if tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        raise UserError(f"the download of {entry.name} from {entry.url} was empty and was not kept; try again later")
    if entry.sha256 is not None and h.hexdigest() != entry.sha256.lower():
        tmp.unlink(missing_ok=True)
        raise UserError(f"the download of {entry.name} from {entry.url} has sha256 {h.hexdigest()} instead of {entry.sha256}, so it was not kept; try again, and report it if it persists")
    os.replace(tmp, target)


def _member_target(entry: CorpusEntry, member: str) -> str | None:
    for src, dst in entry.members:
        if src.endswith("/") and member.startswith(src) and member != src:
            rel = dst + member[len(src) :]
        elif member == src:
            rel = dst
        else:
            continue
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts:
            return None
        return rel
    return None


def _open_members(archive: Path) -> Iterator[tuple[str, object]]:
    """(name, opener) for every regular file of a zip or tar archive."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, (lambda info=info, zf=zf: zf.open(info))
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for info in tf:
                if info.isfile():
                    yield info.name, (lambda info=info, tf=tf: tf.extractfile(info))
    else:
        raise ValueError("not a zip or tar archive")


def _extract(entry: CorpusEntry, archive: Path, root: Path) -> None:
    try:
        found = 0
        for member, opener in _open_members(archive):
            rel = _member_target(entry, member.removeprefix("./"))
            if rel is None:
                continue
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out, opener() as src:  # type: ignore[operator]
                    shutil.copyfileobj(src, out, _CHUNK)
                os.replace(tmp, dest)
            finally:
                Path(tmp).unlink(missing_ok=True)
            found += 1
    except (OSError, ValueError, zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        archive.unlink(missing_ok=True)
        raise UserError(f"the download of {entry.name} ({archive}) is not a readable archive ({e}), so it was deleted; try again") from e
    if found == 0:
        archive.unlink(missing_ok=True)
        raise UserError(f"the download of {entry.name} from {entry.url} holds none of the expected files, so it was deleted; the upstream layout may have changed")


# -- conversions -----------------------------------------------------------------------------
_WORDNET_POS = {"n": "n", "v": "v", "a": "a", "s": "a", "r": "r"}


def wordnet_definitions(dict_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``lemma<TAB>pos<TAB>gloss`` lines (one per synset, its first lemma, the gloss
    without example sentences) from WordNet's ``data.{noun,verb,adj,adv}``; atomic."""
    dict_dir, out = Path(dict_dir), Path(out)
    lines: list[str] = []
    for part in ("noun", "verb", "adj", "adv"):
        src = dict_dir / f"data.{part}"
        if not src.is_file():
            raise UserError(f"WordNet file {src} is missing; the WordNet download is incomplete, so delete {dict_dir} and try again")
        with open(src, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or not line.strip():  # the license header
                    continue
                head, _, gloss = line.partition("|")
                fields = head.split()
                gloss = gloss.strip()
                cut = gloss.find('; "')
                if cut >= 0:
                    gloss = gloss[:cut].strip()
                lines.append(f"{fields[4].replace('_', ' ')}\t{_WORDNET_POS[fields[2]]}\t{gloss}\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
    os.replace(tmp, out)
    return out


# -- overview --------------------------------------------------------------------------------
def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def status(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """One row per registry entry, for ``neuroplastic data``."""
    rows = []
    for entry in REGISTRY.values():
        local = find_local(entry.name, data_dir)
        files = [
            {"split": split, "path": str(path), "size_bytes": _size(path)}
            for split, path in local_files(entry.name, data_dir)
        ]
        rows.append(
            {
                "name": entry.name,
                "description": entry.description,
                "available": local is not None,
                "path": str(local) if local is not None else None,
                "size_bytes": _size(local) if local is not None else None,
                "license": entry.license,
                "format": entry.format,
                "url": entry.url,
                "sha256": entry.sha256,
                "stream": f"hf:{entry.hf}" if entry.hf else None,
                "downloadable": entry.downloadable,
                "files": files,  # every local file found, with its split (None: the corpus has none)
                "splits": [n for n, _ in entry.splits],
            }
        )
    return rows


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())
