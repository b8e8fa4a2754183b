"""Every command in the README's command list runs, in the order shown, with tiny sizes.

The fast test parses the list, checks that every command is one the CLI accepts, and runs the
first commands (train / resume / evaluate / generate / data) end to end in a fresh directory,
as a new user would. The slow test runs the whole list; the real-model lines run only where
SmolLM2-135M-Instruct is already in the model cache (tests never download weights).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from neuroplastic.cli import build_parser
from tests.conftest import ROOT

README = ROOT / "README.md"
SHARED = ROOT.parent / "shared" / "data"

#: overrides that make any gradient recipe take seconds
TINY = [
    "model.n_embd=32", "model.n_head=2", "model.block_size=32", "train.batch_size=2",
    "train.eval_batches=1", "train.log_interval=1", "train.ckpt_interval=2", "train.eval_interval=2",
    "train.sample_tokens=4", "train.progress=false", "train.tensorboard=false", "train.warmup_steps=1",
]
STEPS = {"2000": "2", "2500": "4"}


def readme_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    block = text.split("With the environment active", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def tiny(cmd: list[str]) -> list[str]:
    """The README command with tiny sizes (the same overrides for a run and its --resume)."""
    out = [f"train.max_steps={STEPS[a.split('=', 1)[1]]}" if a.startswith("train.max_steps=") else a
           for a in cmd]
    if cmd[:2] == ["neuroplastic", "train"]:
        if not any(a.startswith("train.max_steps=") for a in out):
            out.append("train.max_steps=2")
        if cmd[2] in ("tiny", "neuroplastic-llm", "agiformer"):
            out += TINY + (["model.n_layer=1"] if not any(a.startswith("model.n_layer") for a in cmd) else [])
        if cmd[2] == "neuroplastic-llm":
            out += ["reward.interval=1", "reward.max_new_tokens=4"]
        if cmd[2] == "controlled-generation":
            out += ["train.progress=false", "train.tensorboard=false", "train.batch_size=2",
                    "train.eval_interval=0", "options.samples_per_prompt=2", "options.prompts_per_step=1",
                    "options.max_new_tokens=[6, 6, 6]", "options.term_options={length: {target: 4, unit: tokens}}"]
        if cmd[2] == "needle-recall":
            out += ["train.progress=false", "train.tensorboard=false"]
    if cmd[:2] == ["neuroplastic", "evaluate"]:
        if "--task" not in cmd or "wikitext2" in cmd:
            out += ["--batches", "1"]
        if "needle" in cmd:
            out += ["--lengths", "128", "--trials", "1"]
        if "--limit" in cmd:
            out[out.index("--limit") + 1] = "2"
    if cmd[:2] == ["neuroplastic", "generate"]:
        out += ["--max-new-tokens", "4"]
    if cmd[:2] == ["neuroplastic", "ablate"]:
        out += ["--seeds", "2", *TINY, "model.n_layer=1", "train.max_steps=2"]
    if cmd[:3] == ["neuroplastic", "neurogen", "train"]:
        out = [a if a != "300" else "2" for a in out] + ["--scale", "0.03125", "--embedding-dim", "8",
                                                        "--tokens-per-chunk", "64", "--max-seq-length", "16",
                                                        "--gpu-device", "-1", "--no-progress", "--no-tensorboard"]
    if cmd[:3] == ["neuroplastic", "neurogen", "ablate"]:
        out += ["--seeds", "2", "--steps", "2", "--scale", "0.03125", "--batch-size", "2", "--seq-len", "8",
                "--embedding-dim", "8"]
    return out


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("NEUROPLASTIC_DEBUG", None)
    if cmd[0] == "neuroplastic":
        cmd = [sys.executable, "-m", "neuroplastic", *cmd[1:]]
    elif cmd[0] == "python":
        cmd = [sys.executable, *cmd[1:]]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_every_readme_command_is_one_the_cli_accepts():
    cmds = readme_commands()
    assert len(cmds) >= 20
    parser = build_parser()
    for cmd in cmds:
        assert cmd[0] in ("neuroplastic", "python"), cmd
        if cmd[0] == "python":
            assert (ROOT / "src" / "neuroplastic" / "evaluation" / "lm_eval_adapter.py").is_file()
            continue
        args, extra = parser.parse_known_args(cmd[1:])
        assert getattr(args, "func", None) is not None, cmd
        assert all("=" in e and not e.startswith("-") for e in extra), (cmd, extra)
    # no two runs of the list write the same run directory unless one resumes the other
    outs = [next((a for a in c if a.startswith("train.out_dir=")), f"train.out_dir=runs/{c[2]}")
            for c in cmds if c[:2] == ["neuroplastic", "train"] and "--resume" not in c]
    assert len(outs) == len(set(outs)), outs


def copy_docs(cwd: Path) -> None:
    shutil.copytree(ROOT / "docs", cwd / "docs", ignore=shutil.ignore_patterns("*.png"))


def test_first_readme_commands_run_in_order_as_a_new_user_would(tmp_path):
    """recipes, train, --resume, evaluate, generate, mmlu, data: as written, tiny sizes."""
    copy_docs(tmp_path)
    for cmd in readme_commands()[:7]:
        r = run(tiny(cmd), tmp_path)
        if "--task" in cmd and not SHARED.is_dir() and r.returncode == 2 and "no local copy" in r.stderr:
            continue  # no MMLU copy on this machine: one clear sentence, what a new user sees
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    assert (tmp_path / "runs" / "tiny" / "checkpoints").is_dir()
    meta = sorted((tmp_path / "runs" / "tiny" / "checkpoints").glob("step_*"))
    assert meta and meta[-1].name.endswith("4")  # the --resume line continued to its max_steps


REAL = "smollm2-135m-instruct"


def model_cached() -> bool:
    from neuroplastic.models.registry import is_cached

    return is_cached(REAL)


@pytest.mark.slow
def test_every_readme_command_runs_in_order(tmp_path):
    if not SHARED.is_dir():
        pytest.skip("the shared data folder is absent (tinyshakespeare, MMLU)")
    copy_docs(tmp_path)
    skipped = []
    for cmd in readme_commands():
        if REAL in " ".join(cmd) and not model_cached():
            skipped.append(cmd)
            continue
        if cmd[1] == "cot":
            cmd = cmd + {"demo": ["--steps", "1", "--num_examples", "1", "--max_new_tokens", "8"],
                         "train": ["--max_steps", "1", "--batch_size", "1"],
                         "evaluate": ["--num_examples", "1", "--max_new_tokens", "8"]}[cmd[2]]
        if cmd[0] == "python" and "lm_eval_adapter" in " ".join(cmd):
            cmd = cmd + ["--limit", "2"]
        if cmd[1:3] == ["train", "needle-recall"]:
            continue  # its loop has its own acceptance test (tests/test_recall_recipe.py)
        r = run(tiny(cmd), tmp_path, timeout=1800)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    if skipped:
        pytest.skip(f"{len(skipped)} real-model lines need {REAL} in the model cache")
