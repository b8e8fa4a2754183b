from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from neuroplastic.data import registry
from neuroplastic.data.sources import (
    WORDNET_LINES_PER_DOC,
    iter_documents,
    iter_jsonl,
    load_documents,
    read_jsonl,
)
from neuroplastic.errors import UserError


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test here may download: a corpus missing locally must fail, not fetch."""
    monkeypatch.setenv("NEUROPLASTIC_OFFLINE", "1")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# -- plain files and directories ---------------------------------------------------------------
def test_text_file_is_one_document(text_file):
    docs = load_documents(str(text_file))
    assert docs == [text_file.read_text(encoding="utf-8")]
    assert list(iter_documents(str(text_file))) == docs


def test_text_file_bom_and_bad_bytes(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbfhello caf\xe9 world")  # a BOM and one latin-1 byte
    with pytest.warns(UserWarning, match=r"bom\.txt is not valid UTF-8: 1 byte could not be decoded"):
        assert load_documents(str(p)) == ["hello caf\ufffd world"]


def test_max_chars_truncates_total(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a" * 10}, {"text": "b" * 10}, {"text": "c" * 10}])
    assert load_documents(str(p), max_chars=15) == ["a" * 10, "b" * 5]
    assert load_documents(str(p), max_chars=20) == ["a" * 10, "b" * 10]
    assert sum(map(len, load_documents(str(p), max_chars=0))) == 30


def test_directory_reads_text_md_jsonl_sorted_recursively(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").mkdir()
    (d / "b.txt").write_text("second")
    (d / "a.md").write_text("# first")
    (d / "sub" / "c.txt").write_text("fourth")
    write_jsonl(d / "c.jsonl", [{"text": "third-1"}, {"text": "third-2"}])
    (d / "empty.txt").write_text("")  # skipped inside a folder
    (d / "ignored.csv").write_text("x,y")
    (d / ".hidden" / "secret.txt").write_text("hidden")
    assert load_documents(str(d)) == ["# first", "second", "third-1", "third-2", "fourth"]


def test_jsonl_fields(tmp_path):
    p = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"question": "Q1?", "answer": "A1", "text": "t1"}, "", {"question": "Q2?", "answer": "A2", "text": "t2"}],
    )
    assert load_documents(str(p)) == ["t1", "t2"]
    assert load_documents(str(p), field="question") == ["Q1?", "Q2?"]
    assert load_documents(str(p), field="question+answer") == ["Q1?\nA1", "Q2?\nA2"]


def test_iter_documents_is_lazy(tmp_path):
    p = write_jsonl(tmp_path / "big.jsonl", [{"text": f"doc {i}"} for i in range(1000)] + ["not json"])
    it = iter_documents(str(p))
    assert isinstance(it, types.GeneratorType)
    assert [next(it) for _ in range(3)] == ["doc 0", "doc 1", "doc 2"]  # the bad last line is not read yet


# -- errors -------------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError, match="nope.txt.*does not exist"):
        load_documents(str(missing))
    with pytest.raises(UserError, match="nope.txt"):
        iter_documents(str(missing))  # raised at once, not at the first next()


def test_unknown_name_suggests_corpus():
    with pytest.raises(UserError, match="tinyshakespeare"):
        load_documents("tinyshakespear")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("  \n\n")
    with pytest.raises(UserError, match=r"empty\.txt is empty"):
        load_documents(str(p))
    q = tmp_path / "empty.jsonl"
    q.write_text("")
    with pytest.raises(UserError, match=r"empty\.jsonl is empty"):
        load_documents(str(q))


def test_no_text_found(tmp_path):
    p = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(UserError, match=r"no text found in .*blank\.jsonl"):
        load_documents(str(p))
    d = tmp_path / "nothing"
    d.mkdir()
    (d / "x.txt").write_text("")
    with pytest.raises(UserError, match="no text found"):
        load_documents(str(d))
    e = tmp_path / "only_csv"
    e.mkdir()
    (e / "a.csv").write_text("1,2")
    with pytest.raises(UserError, match=r"only_csv has no \.txt, \.md or \.jsonl files"):
        load_documents(str(e))


def test_binary_files(tmp_path):
    nul = tmp_path / "model.txt"
    nul.write_bytes(b"some text\x00\x01\x02 more")
    with pytest.raises(UserError, match=r"model\.txt looks binary"):
        load_documents(str(nul))
    junk = tmp_path / "junk.txt"
    junk.write_bytes(bytes(range(128, 256)) * 50)  # no NUL, but not UTF-8 at all
    with pytest.raises(UserError, match=r"junk\.txt looks binary"):
        load_documents(str(junk))
    d = tmp_path / "dir"
    d.mkdir()
    (d / "ok.txt").write_text("fine")
    (d / "z.jsonl").write_bytes(b"\x00\x00\x00")
    with pytest.raises(UserError, match=r"z\.jsonl looks binary"):
        load_documents(str(d))


def test_unreadable_file(tmp_path, monkeypatch):
    p = tmp_path / "locked.txt"
    p.write_text("secret")

    def deny(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(UserError, match=r"cannot read .*locked\.txt \(Permission denied\)"):
        load_documents(str(p))


def test_bad_jsonl_lines(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{not json", {"text": "never"}])
    with pytest.raises(UserError, match=r"bad\.jsonl line 2 is not valid JSON"):
        load_documents(str(p))
    q = write_jsonl(tmp_path / "nofield.jsonl", [{"text": "ok"}, {"body": "x", "id": 1}])
    with pytest.raises(UserError, match=r"nofield\.jsonl line 2 has no 'text' field \(it has body, id\)"):
        load_documents(str(q))
    r = write_jsonl(tmp_path / "list.jsonl", [[1, 2]])
    with pytest.raises(UserError, match=r"list\.jsonl line 1 is not a JSON object"):
        load_documents(str(r))
    s = write_jsonl(tmp_path / "num.jsonl", [{"text": 3}])
    with pytest.raises(UserError, match=r"num\.jsonl line 1: field 'text' is a int"):
        load_documents(str(s))


def test_read_jsonl_strict_and_skipping_damaged_lines(tmp_path):
    p = write_jsonl(tmp_path / "log.jsonl", ["\ufeff" + json.dumps({"a": 1}), "", "[1]", {"b": 2}, '{"c": 3, "cut'])
    with pytest.raises(UserError, match=r"log\.jsonl line 3 is not a JSON object; mend it"):
        read_jsonl(p, fix="mend it")
    assert read_jsonl(p, skip_damaged=True) == [{"a": 1}, {"b": 2}]
    assert list(iter_jsonl(p, skip_damaged=True)) == [(1, {"a": 1}), (4, {"b": 2})]
    with pytest.raises(UserError, match=r"log\.jsonl line 5 is not valid JSON"):
        read_jsonl(write_jsonl(tmp_path / "log.jsonl", [{"a": 1}, {"b": 2}, {}, {}, '{"c": 3, "cut']))


def test_error_messages_are_one_sentence(tmp_path):
    with pytest.raises(UserError) as info:
        load_documents(str(tmp_path / "missing.jsonl"))
    assert "\n" not in str(info.value) and "missing.jsonl" in str(info.value)


# -- registry corpora from a data dir -------------------------------------------------------------
def test_stories_and_wikitext_formats(tmp_path):
    data = tmp_path / "data"
    (data / "tinystories").mkdir(parents=True)
    (data / "tinystories" / "TinyStories-valid.txt").write_text(
        "Once upon a time.\nThe end.\n<|endoftext|>\nAnother story.\n<|endoftext|>\n\n"
    )
    assert load_documents("tinystories", data_dir=str(data)) == ["Once upon a time.\nThe end.", "Another story."]
    (data / "wikitext2").mkdir()
    (data / "wikitext2" / "wiki.train.raw").write_text(
        " \n = Alpha = \n \n Alpha is first . \n = = History = = \n Old . \n = Beta = \n Beta text . \n"
    )
    docs = load_documents("wikitext2", data_dir=str(data))
    assert len(docs) == 2 and docs[0].startswith("= Alpha =") and "History" in docs[0]
    assert docs[1].startswith("= Beta =")


def test_missing_corpus_does_not_download(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "find_local", lambda name, data_dir=None, split=None: None)
    with pytest.raises(UserError, match="downloads are off"):
        load_documents("wikitext103")


def test_streamed_corpus_needs_max_chars():
    with pytest.raises(UserError, match="too large to load whole"):
        load_documents("slimpajama")


def shared(name: str) -> Path:
    path = registry.find_local(name)
    if path is None:
        pytest.skip(f"{name} is not in any data dir")
    return path


def test_shared_tinyshakespeare():
    path = shared("tinyshakespeare")
    docs = load_documents("tinyshakespeare")
    assert len(docs) == 1 and docs[0] == path.read_text(encoding="utf-8")
    assert docs[0].startswith("First Citizen:")
    assert load_documents("tinyshakespeare", max_chars=100) == [docs[0][:100]]


def test_shared_gsm8k():
    shared("gsm8k")
    docs = load_documents("gsm8k")
    assert len(docs) == 7473
    assert docs[0].startswith("Natalia sold clips") and docs[0].endswith("#### 72")


def test_shared_wordnet():
    shared("wordnet")
    it = iter_documents("wordnet")
    first = next(it)
    lines = first.split("\n")
    assert len(lines) == WORDNET_LINES_PER_DOC
    assert lines[0].startswith("entity (n): that which is perceived")
    assert all(" (" in line and "): " in line for line in lines)


def test_shared_tinystories_hellaswag_mmlu():
    shared("tinystories")
    stories = load_documents("tinystories")
    assert len(stories) >= 10 and all("\n" not in s or len(s) > 100 for s in stories)
    shared("hellaswag")
    hs = load_documents("hellaswag")
    assert len(hs) >= 500 and hs[0].startswith("A man is sitting on a roof.")
    shared("mmlu")
    mm = load_documents("mmlu", max_chars=5000)
    assert mm[0].count("\n") == 5 and "\nAnswer: " in mm[0]


# -- Hugging Face datasets ------------------------------------------------------------------------
@pytest.fixture
def hf(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", type(datasets.config.HF_DATASETS_CACHE)(tmp_path / "hf-cache"))
    datasets.disable_progress_bars()
    yield datasets
    datasets.enable_progress_bars()


def test_hf_saved_to_disk(hf, tmp_path):
    ds = hf.Dataset.from_dict({"text": ["alpha", "beta", ""], "q": ["x", "y", "z"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_documents(f"hf:{tmp_path / 'saved'}") == ["alpha", "beta"]
    assert list(iter_documents(f"hf:{tmp_path / 'saved'}", field="q")) == ["x", "y", "z"]
    with pytest.raises(UserError, match="has no 'zz' column"):
        load_documents(f"hf:{tmp_path / 'saved'}", field="zz")
    hf.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    assert load_documents(f"hf:{tmp_path / 'dd'}@test") == ["beta"]
    with pytest.raises(UserError, match="no split 'nope'"):
        load_documents(f"hf:{tmp_path / 'dd'}@nope")


def test_hf_local_data_files(hf, tmp_path):
    d = tmp_path / "local"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"text": f"doc {i}", "n": i} for i in range(4)])
    assert load_documents(f"hf:{d}") == [f"doc {i}" for i in range(4)]
    assert list(iter_documents(f"hf:{d}@train")) == [f"doc {i}" for i in range(4)]  # streaming


def test_hf_bad_spec():
    with pytest.raises(UserError, match="hf:NAME"):
        load_documents("hf:")
    with pytest.raises(UserError, match="hf:NAME"):
        load_documents("hf:name@")
