"""benchmarks/run_all.py: discovery, quick/full arguments, the docs section, failures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import run_all  # noqa: E402

OK = '''import sys
from pathlib import Path
if "--write-docs" in sys.argv:
    Path(sys.argv[0]).with_suffix(".wrote").write_text(" ".join(sys.argv[1:]))
print("| config | tokens/s |")
print("| quick |" if "--quick" in sys.argv else "| full |", 123)
# flags: "--quick" "--write-docs"
'''
BAD = '''import sys
print("boom", file=sys.stderr)
raise SystemExit(3)
'''


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    d = tmp_path / "benchmarks"
    d.mkdir()
    (d / "alpha.py").write_text(OK, encoding="utf-8")
    (d / "beta.py").write_text(BAD, encoding="utf-8")
    (d / "_helper.py").write_text("raise SystemExit(9)\n", encoding="utf-8")
    (d / "run_all.py").write_text("raise SystemExit(9)\n", encoding="utf-8")
    return d


def test_discovers_every_real_benchmark():
    found = run_all.discover()
    for name in ("throughput", "plasticity_overhead", "fast_weight", "agiformer_vs_gpt", "distributed"):
        assert name in found
    assert "run_all" not in found
    # every known quick setting belongs to an existing script
    assert set(run_all.QUICK_ARGS) <= set(found)


def test_quick_run_reports_failures_and_writes_the_section(bench_dir, tmp_path, capsys):
    docs = tmp_path / "BENCHMARKS.md"
    docs.write_text("# Benchmarks\n\n<!-- begin:other -->\nkeep me\n<!-- end:other -->\n", encoding="utf-8")
    argv = ["--quick", "--write-docs", "--bench-dir", str(bench_dir), "--docs", str(docs),
            "--log-dir", str(tmp_path / "logs")]
    assert run_all.main(argv) == 1  # beta failed
    text = docs.read_text(encoding="utf-8")
    assert "keep me" in text and "<!-- begin:run-all -->" in text
    assert "| alpha |" in text and "| ok |" in text.split("| alpha |")[1].splitlines()[0]
    assert "FAILED (exit 3)" in text
    assert "alpha.py --quick --write-docs" in text  # the exact command
    assert "torch" in text and "GPU numbers: not measured here" in text
    assert (bench_dir / "alpha.wrote").read_text() == "--quick --write-docs"
    assert "boom" in (tmp_path / "logs" / "beta.log").read_text()
    out = capsys.readouterr()
    assert "| quick | 123" in out.err + out.out
    # a second run replaces the section instead of appending another
    assert run_all.main(argv) == 1
    assert docs.read_text(encoding="utf-8").count("<!-- begin:run-all -->") == 1


def test_quick_alone_leaves_docs_alone_and_only_filters(bench_dir, tmp_path):
    docs = tmp_path / "BENCHMARKS.md"
    assert run_all.main(["--quick", "--only", "alpha", "--bench-dir", str(bench_dir),
                         "--docs", str(docs)]) == 0
    assert not docs.exists() and not (bench_dir / "alpha.wrote").exists()
    # a full run writes by default
    assert run_all.main(["--only", "alpha", "--bench-dir", str(bench_dir), "--docs", str(docs)]) == 0
    assert "| alpha |" in docs.read_text() and "quick: smoke" not in docs.read_text()
    assert (bench_dir / "alpha.wrote").read_text() == "--write-docs"


def test_bad_arguments_exit_2(bench_dir, capsys):
    assert run_all.main(["--only", "gamma", "--bench-dir", str(bench_dir)]) == 2
    err = capsys.readouterr().err
    assert "no benchmark named 'gamma'" in err and "alpha" in err
    assert run_all.main(["--write-docs", "--no-docs", "--bench-dir", str(bench_dir)]) == 2
    assert run_all.main(["--list", "--bench-dir", str(bench_dir)]) == 0
    listed = capsys.readouterr().out
    assert "alpha" in listed and "beta" in listed and "_helper" not in listed and "run_all" not in listed


def test_docs_sections_and_parts_replace_in_place(tmp_path):
    import _docs

    doc = tmp_path / "docs" / "B.md"
    _docs.write_section(doc, "a", "first\n")
    _docs.write_section(doc, "b", "other\n\n")
    assert doc.read_text() == "# Benchmarks\n\n<!-- begin:a -->\nfirst\n<!-- end:a -->\n\n<!-- begin:b -->\nother\n<!-- end:b -->\n"
    _docs.write_section(doc, "a", "second\n")
    assert _docs.read_section(doc, "a") == "second\n" and _docs.read_section(doc, "c") is None
    assert doc.read_text().count("<!-- begin:a -->") == 1 and "other" in doc.read_text()
    _docs.write_part(doc, "p", "x", "x1\n", intro="## P\n\n")
    _docs.write_part(doc, "p", "y", "y1\n")
    _docs.write_part(doc, "p", "x", "x2\n")
    assert _docs.read_section(doc, "p") == (
        "## P\n\n<!-- begin:p/x -->\nx2\n<!-- end:p/x -->\n<!-- begin:p/y -->\ny1\n<!-- end:p/y -->\n")
    assert "_docs" not in run_all.discover(ROOT / "benchmarks")
