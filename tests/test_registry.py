from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import re
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from neuroplastic.data import registry
from neuroplastic.data.registry import REGISTRY, CorpusEntry, data_dirs, find_local, resolve, status
from neuroplastic.errors import UserError

FORMATS = {"text", "stories", "wikitext", "gsm8k", "hellaswag", "mmlu", "wordnet", "hf"}
EXPECTED = {"tinyshakespeare", "tinystories", "wikitext2", "wikitext103", "enwik8", "gsm8k",
            "hellaswag", "mmlu", "wordnet", "slimpajama"}


def shared_dir() -> Path:
    """The workplace's shared data folder, found through the normal lookup; skip if absent."""
    for d in data_dirs():
        if (d / "MANIFEST.sha256").is_file():
            return d
    pytest.skip("no shared data folder (with MANIFEST.sha256) in the data dirs")


# -- the table itself ----------------------------------------------------------------------------
def test_entries_are_well_formed():
    assert EXPECTED <= set(REGISTRY)
    for name, e in REGISTRY.items():
        assert e.name == name and e.description and e.license
        assert e.url.startswith(("https://", "http://"))
        assert e.format in FORMATS
        assert e.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", e.sha256)
        for rel, digest in e.local_sha256.items():
            assert re.fullmatch(r"[0-9a-f]{64}", digest) and not Path(rel).is_absolute()
        assert all(not Path(p).is_absolute() and ".." not in Path(p).parts for p in e.paths)
        if not e.downloadable:
            assert e.hf and e.format == "hf"
        if e.members:
            assert e.download_to


def test_known_upstream_hashes_are_the_pinned_upstream_copies():
    # Only files whose shared copy is upstream bytes at a pinned commit carry an upstream sha256.
    known = {n for n, e in REGISTRY.items() if e.sha256}
    assert known == {"tinyshakespeare", "gsm8k"}
    for n in known:
        e = REGISTRY[n]
        assert re.search(r"/[0-9a-f]{40}/", e.url), "a known hash needs a pinned URL"
        assert e.local_sha256[e.paths[0]] == e.sha256


def test_unknown_name_suggests_close_ones():
    with pytest.raises(UserError, match="did you mean tinyshakespeare"):
        resolve("tinyshakspeare")
    with pytest.raises(UserError, match="unknown corpus 'zzzz'.*known names"):
        find_local("zzzz")
    assert registry.get_entry("WikiText-2") is REGISTRY["wikitext2"]


# -- lookup ----------------------------------------------------------------------------------------
def test_data_dirs_order(tmp_path, monkeypatch):
    a, b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    a.mkdir()
    b.mkdir()
    monkeypatch.setenv("NEUROPLASTIC_DATA", str(b))
    monkeypatch.setenv("NEUROPLASTIC_CACHE", str(cache))
    dirs = data_dirs(str(a))
    assert dirs[0] == a.resolve() and dirs[1] == b.resolve() and dirs[-1] == cache
    with pytest.raises(UserError, match="data dir .*missing does not exist"):
        data_dirs(str(tmp_path / "missing"))


def test_find_local_prefers_data_dir_arg(tmp_path):
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("To be.")
    assert find_local("tinyshakespeare", str(tmp_path)) == tmp_path.resolve() / "tinyshakespeare" / "input.txt"
    assert resolve("tinyshakespeare", str(tmp_path), download=False).read_text() == "To be."


def test_find_local_finds_shared_data():
    root = shared_dir()
    for name in ("tinyshakespeare", "gsm8k", "hellaswag", "mmlu", "wordnet", "tinystories"):
        path = find_local(name)
        assert path is not None and path.exists(), name
    assert find_local("tinyshakespeare") == root / "tinyshakespeare" / "input.txt"


def test_local_copies_match_recorded_sha256():
    root = shared_dir()
    manifest = {}
    for line in (root / "MANIFEST.sha256").read_text().splitlines():
        digest, _, rel = line.partition("  ")
        manifest[rel.removeprefix("./")] = digest
    checked = 0
    for e in REGISTRY.values():
        for rel, digest in e.local_sha256.items():
            if (root / rel).is_file():
                assert manifest[rel] == digest, rel
            if (root / rel).exists():
                assert registry.sha256_of(root / rel) == digest, rel
                checked += 1
    assert checked >= 6


def test_wordnet_definitions_reproduce_the_shared_tsv(tmp_path):
    root = shared_dir()
    src = root / "nltk_data" / "corpora" / "wordnet"
    if not (src / "data.noun").is_file():
        pytest.skip("no WordNet data files")
    out = registry.wordnet_definitions(src, tmp_path / "definitions.tsv")
    assert registry.sha256_of(out) == REGISTRY["wordnet"].local_sha256["wordnet/definitions.tsv"]


def test_status_lists_every_entry(tmp_path):
    rows = status()
    assert [r["name"] for r in rows] == list(REGISTRY)
    for r in rows:
        assert {"name", "description", "available", "path", "size_bytes", "license"} <= set(r)
        assert isinstance(r["available"], bool)
        assert (r["path"] is not None) == r["available"] == (r["size_bytes"] is not None)
        assert r["available"] == (find_local(r["name"]) is not None)
    slim = next(r for r in rows if r["name"] == "slimpajama")
    assert slim["stream"] == "hf:cerebras/SlimPajama-627B" and not slim["downloadable"]


# -- downloads (loopback and file:// only) -----------------------------------------------------------
@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Only the cache dir (empty, under tmp_path) is searched; downloads are allowed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.delenv("NEUROPLASTIC_DATA", raising=False)
    monkeypatch.delenv("NEUROPLASTIC_OFFLINE", raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("NEUROPLASTIC_CACHE", str(cache))
    assert data_dirs() == [cache]
    return cache


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 (ephemeral port) serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def fake_entry(monkeypatch, name: str = "tinyshakespeare", **changes) -> CorpusEntry:
    entry = dataclasses.replace(REGISTRY[name], **changes)
    monkeypatch.setitem(REGISTRY, name, entry)
    return entry


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def test_download_over_http(isolated, server, monkeypatch):
    www, base = server
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    (www / "input.txt").write_bytes(payload)
    fake_entry(monkeypatch, url=f"{base}/input.txt", sha256=hashlib.sha256(payload).hexdigest(), size_bytes=len(payload))
    path = resolve("tinyshakespeare")
    assert path == isolated / "tinyshakespeare" / "input.txt" and path.read_bytes() == payload
    assert leftovers(isolated) == ["input.txt"]
    assert find_local("tinyshakespeare") == path
    (www / "input.txt").unlink()  # a second resolve uses the cached copy
    assert resolve("tinyshakespeare") == path


def test_download_over_http_bad_sha256_is_not_kept(isolated, server, monkeypatch):
    www, base = server
    (www / "input.txt").write_bytes(b"tampered")
    fake_entry(monkeypatch, url=f"{base}/input.txt", sha256="0" * 64, size_bytes=None)
    with pytest.raises(UserError, match="sha256 .* instead of 0{64}, so it was not kept"):
        resolve("tinyshakespeare")
    assert leftovers(isolated) == []
    assert find_local("tinyshakespeare") is None


def test_download_http_error(isolated, server, monkeypatch):
    _, base = server
    fake_entry(monkeypatch, url=f"{base}/missing.txt")
    with pytest.raises(UserError, match=r"could not download tinyshakespeare from http://127\.0\.0\.1.*missing\.txt"):
        resolve("tinyshakespeare")
    assert leftovers(isolated) == []


def test_download_file_url_good_and_bad(isolated, tmp_path, monkeypatch):
    src = tmp_path / "train.jsonl"
    src.write_bytes(b'{"question": "1+1?", "answer": "2\\n#### 2"}\n')
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    fake_entry(monkeypatch, "gsm8k", url=src.as_uri(), sha256="f" * 64, size_bytes=None)
    with pytest.raises(UserError, match="not kept"):
        resolve("gsm8k")
    assert leftovers(isolated) == []
    fake_entry(monkeypatch, "gsm8k", url=src.as_uri(), sha256=good, size_bytes=None)
    path = resolve("gsm8k")
    assert path.read_bytes() == src.read_bytes()
    from neuroplastic.data.sources import load_documents

    assert load_documents("gsm8k") == ["1+1?\n2\n#### 2"]


def test_download_unknown_hash_checks_size_and_format(isolated, tmp_path, monkeypatch):
    src = tmp_path / "input.txt"
    src.write_bytes(b"short")
    fake_entry(monkeypatch, url=src.as_uri(), sha256=None, size_bytes=1000)
    with pytest.raises(UserError, match="has 5 bytes instead of 1000, so it was deleted"):
        resolve("tinyshakespeare")
    assert leftovers(isolated) == []
    src.write_bytes(b"<html>\x00\x01")
    fake_entry(monkeypatch, url=src.as_uri(), sha256=None, size_bytes=None)
    with pytest.raises(UserError, match="is binary"):
        resolve("tinyshakespeare")
    assert leftovers(isolated) == []


def test_download_zip_archive(isolated, server, monkeypatch):
    www, base = server
    with zipfile.ZipFile(www / "enwik8.zip", "w") as zf:
        zf.writestr("enwik8", "<mediawiki>hello</mediawiki>")
        zf.writestr("README", "ignored")
    fake_entry(monkeypatch, "enwik8", url=f"{base}/enwik8.zip", size_bytes=None)
    path = resolve("enwik8")
    assert path == isolated / "enwik8" / "enwik8" and path.read_text() == "<mediawiki>hello</mediawiki>"
    assert leftovers(isolated) == ["enwik8", "enwik8.zip"]


def test_download_bad_archive_is_deleted(isolated, server, monkeypatch):
    www, base = server
    (www / "enwik8.zip").write_bytes(b"this is an error page, not a zip")
    fake_entry(monkeypatch, "enwik8", url=f"{base}/enwik8.zip", size_bytes=None)
    with pytest.raises(UserError, match="not a readable archive"):
        resolve("enwik8")
    assert leftovers(isolated) == []


def test_download_wordnet_tarball_is_converted(isolated, tmp_path, monkeypatch):
    header = "  1 This software and database is being provided to you  \n"
    rows = {
        "noun": "00001740 03 n 01 entity 0 000 | that which exists; \"an example\"  \n",
        "verb": "00001740 29 v 01 breathe 0 000 | draw air into, and expel out of, the lungs  \n",
        "adj": "00001740 00 s 01 able(p) 0 000 | having the necessary means;  \n",
        "adv": "00001837 02 r 01 barely 0 000 | only just  \n",
    }
    archive = tmp_path / "WordNet-3.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for part, row in rows.items():
            data = (header + row).encode()
            info = tarfile.TarInfo(f"WordNet-3.0/dict/data.{part}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    fake_entry(monkeypatch, "wordnet", url=archive.as_uri())
    path = resolve("wordnet")
    assert path == isolated / "wordnet" / "definitions.tsv"
    assert path.read_text().splitlines() == [
        "entity\tn\tthat which exists",
        "breathe\tv\tdraw air into, and expel out of, the lungs",
        "able(p)\ta\thaving the necessary means;",
        "barely\tr\tonly just",
    ]


def test_no_download_when_disabled(isolated, monkeypatch):
    with pytest.raises(UserError, match="not in any data dir .*downloads are off"):
        resolve("wikitext2", download=False)
    monkeypatch.setenv("NEUROPLASTIC_OFFLINE", "1")
    with pytest.raises(UserError, match="downloads are off"):
        resolve("wikitext2")
    with pytest.raises(UserError, match="hf:cerebras/SlimPajama-627B"):
        resolve("slimpajama")
