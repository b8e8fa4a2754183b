"""controlled-generation vs a CE-only fine-tune of the same budget: reward components on
held-out prompts, before and after (issue 6, build item 5).

1. Base model. ``--model PATH``: any local Hugging Face causal LM directory (real GPT-2
   when you have it), used as it is. Without it a GPT-2-architecture model is built from
   a ``transformers.GPT2Config`` (``--size small``: 3 layers x 128, 0.9M parameters,
   CPU minutes; ``--size gpt2``: 12 x 768, vocabulary 50257, 124M parameters,
   the shape of the real GPT-2) with a byte-level BPE tokenizer that the project trains
   on the synthetic curriculum (saved in Hugging Face format next to the model), then
   given a CE pre-training phase on the synthetic curriculum through the project's
   trainer (``neuroplastic train tiny model=INIT``), so that it starts as a "pretrained"
   model that writes sentences; it is exported with ``save_pretrained``.
2. Two fine-tunes from that base with the same budget, seed, data and settings, through
   the real CLI (``neuroplastic train controlled-generation model=BASE ...``): the recipe
   as it is (``options.lam`` > 0: CE + lam * REINFORCE reward loss) and a CE-only arm
   (``options.lam=0``, the recipe otherwise unchanged -- it still samples and scores
   generations every step, and its eligibility-trace rule is still modulated by that
   reward, so the two arms differ only in the reward loss).
3. ``neuroplastic evaluate REWARD_RUN --task rewards --compare CE_RUN`` on prompts of
   concepts held out of the reward loss: the mean of each reward term and of the
   weighted total for the base ("before"), the reward arm and the CE-only arm; over
   several seeds, mean +- 95% CI and the paired difference reward - CE.
4. A table + PNG; ``--write-docs`` puts them into docs/BENCHMARKS.md (section
   ``controlled-generation``).

``--time-steps N`` instead measures the wall time per fine-tuning step of each arm for N
steps (no pre-training: a freshly initialised model, which never emits end-of-text, so
every sample runs to the full generation length -- an upper bound for the first stage)
and records it in its own part of the section.

    python benchmarks/controlled_generation.py --size small --seeds 3 --write-docs
    python benchmarks/controlled_generation.py --size gpt2 --time-steps 4 --write-docs
    python benchmarks/controlled_generation.py --model /path/to/gpt2 --lr 5e-5 --block 256 --steps 300 --write-docs
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _docs  # noqa: E402

from neuroplastic.errors import UserError  # noqa: E402

DOCS = ROOT / "docs" / "BENCHMARKS.md"
KEY = "controlled-generation"

# GPT-2-architecture sizes built from a GPT2Config (vocab: the BPE tokenizer's size, or at
# least this many rows). "micro" exists for the test suite only.
SIZES: dict[str, dict[str, int]] = {
    "micro": {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64, "bpe_vocab": 300, "vocab": 0},
    "small": {"n_layer": 3, "n_head": 4, "n_embd": 128, "n_positions": 256, "bpe_vocab": 2048, "vocab": 0},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "bpe_vocab": 4096,
             "vocab": 50257},
}


@dataclass
class BenchConfig:
    out: Path
    model: str = ""  # a local HF causal LM directory; "" = build one of SIZES and pre-train it
    size: str = "small"
    # CE pre-training of a built model (tiny recipe, whole synthetic curriculum, no stages)
    pretrain_steps: int = 400
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    # fine-tuning, identical in both arms
    steps: int = 50
    batch: int = 8
    block: int = 128
    lr: float = 1e-3  # for a built model; a real pretrained GPT-2 wants ~5e-5
    warmup: int = 10
    lam: float = 0.5  # the reward arm's options.lam (the recipe's default)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lora: int = 0  # LoRA rank (0: full fine-tune, the recipe's default)
    # recipe options shared by both arms; None = the recipe's own value
    max_new_tokens: list[int] | None = None
    samples_per_prompt: int | None = None
    prompts_per_step: int | None = None
    weights: dict[str, float] | None = None
    length_target: int | None = None  # the length term's target in tokens (None: the recipe's)
    device: str = "auto"  # train.device of both arms and the evaluation's device
    # evaluation on held-out prompts (greedy)
    eval_limit: int = 40
    eval_max_new: int = 60
    eval_mode: str = "cli"  # cli: `neuroplastic evaluate --task rewards`; batched: in-process, batched greedy
    show: int = 4  # held-out prompts whose generations are shown side by side
    # --time-steps: only time this many steps of each arm
    time_steps: int = 0
    progress: bool = True

    def validate(self) -> BenchConfig:
        if not self.model and self.size not in SIZES:
            raise UserError(f"--size must be one of {', '.join(s for s in SIZES if s != 'micro')}, got {self.size!r}.")
        if self.model and not Path(self.model).is_dir():
            raise UserError(f"--model {self.model!r} is not a directory; give a local Hugging Face model directory.")
        if self.lam <= 0:
            raise UserError(f"--lam must be > 0 for the reward arm (the CE-only arm has lam = 0), got {self.lam}.")
        if not self.seeds:
            raise UserError("--seeds must be at least 1.")
        if self.steps < 1 or self.pretrain_steps < 0 or self.time_steps < 0:
            raise UserError("--steps must be >= 1 and --pretrain-steps, --time-steps >= 0.")
        if self.eval_mode not in ("cli", "batched"):
            raise UserError(f"--eval-mode must be cli or batched, got {self.eval_mode!r}.")
        if self.length_target is not None and self.length_target < 1:
            raise UserError(f"--length-target must be >= 1 token, got {self.length_target}.")
        return self


# ----------------------------------------------------------------------------- helpers


def _cli(argv: list[str]) -> None:
    """Run ``neuroplastic ARGV`` in this process (its output and progress bars as they come)."""
    from neuroplastic.cli import main

    rc = main(argv)
    if rc != 0:  # the CLI has printed its one-sentence reason on stderr
        raise UserError(f"`neuroplastic {' '.join(argv[:2])} ...` failed with exit code {rc}.")


def _synthetic_texts() -> list[str]:
    from neuroplastic.data.synthetic import STAGES, SyntheticCurriculum

    cur = SyntheticCurriculum(seed=0)
    return [d for s in STAGES for d in cur.documents(s)]


def build_init(cfg: BenchConfig, directory: Path) -> Path:
    """A freshly initialised GPT-2-architecture model + BPE tokenizer, saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from neuroplastic.data.tokenizers import BPETokenizer

    spec = SIZES[cfg.size]
    tok = BPETokenizer.train(_synthetic_texts(), vocab_size=spec["bpe_vocab"])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        n_layer=spec["n_layer"], n_head=spec["n_head"], n_embd=spec["n_embd"],
        n_positions=spec["n_positions"], vocab_size=max(tok.vocab_size, spec["vocab"]),
        bos_token_id=tok.eos_id, eos_token_id=tok.eos_id,
    ))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tok.save(directory)  # tokenizer.json + tokenizer_config.json: loads with AutoTokenizer
    return directory


def pretrain(cfg: BenchConfig, init: Path, directory: Path) -> dict[str, Any]:
    """CE pre-training of ``init`` on the whole synthetic curriculum; exported to ``directory``."""
    from neuroplastic.config import load_config
    from neuroplastic.models.hf import export_merged
    from neuroplastic.training.trainer import Trainer

    run = cfg.out / "pretrain-run"
    shutil.rmtree(run, ignore_errors=True)
    over = [
        f"model={init}", "data.source=synthetic", f"model.block_size={cfg.block}",
        f"train.max_steps={cfg.pretrain_steps}", f"train.batch_size={cfg.pretrain_batch}",
        f"train.lr={cfg.pretrain_lr}", f"train.min_lr={cfg.pretrain_lr / 10}",
        f"train.warmup_steps={min(50, max(1, cfg.pretrain_steps // 10))}", "train.seed=0",
        f"train.eval_interval={cfg.pretrain_steps}", "train.eval_batches=10",
        f"train.ckpt_interval={cfg.pretrain_steps}", "train.keep_best=false",
        "train.tensorboard=false", f"train.progress={str(cfg.progress).lower()}",
        f"train.out_dir={run}",
    ]
    t0 = time.perf_counter()
    trainer = Trainer(load_config("tiny", over))
    summary = trainer.train()
    export_merged(trainer.model, directory, tokenizer=trainer.tokenizer)
    ev = summary["last_eval"]
    return {"steps": cfg.pretrain_steps, "val_loss": ev.get("loss"), "val_bpb": ev.get("bpb"),
            "seconds": time.perf_counter() - t0,
            "command": "neuroplastic train tiny " + " ".join(over)}


def arm_args(cfg: BenchConfig, base: Path, lam: float, seed: int, out: Path, steps: int) -> list[str]:
    """The ``neuroplastic train controlled-generation`` arguments of one arm."""
    args = [
        "train", "controlled-generation", f"model={base}", f"options.lam={lam:g}",
        f"train.seed={seed}", f"train.max_steps={steps}", f"train.batch_size={cfg.batch}",
        f"model.block_size={cfg.block}", f"train.lr={cfg.lr:g}", f"train.min_lr={cfg.lr / 10:g}",
        f"train.warmup_steps={min(cfg.warmup, steps)}", "train.eval_interval=0",
        f"train.ckpt_interval={steps}", "train.keep_best=false", "train.log_interval=1",
        "train.tensorboard=false", f"train.progress={str(cfg.progress).lower()}",
        f"train.out_dir={out}", f"train.device={cfg.device}", "train.sample_tokens=0",
    ]
    if cfg.lora:
        args.append(f"model.lora={{r: {cfg.lora}, alpha: {2 * cfg.lora}}}")
    if cfg.max_new_tokens is not None:
        args.append(f"options.max_new_tokens=[{', '.join(str(n) for n in cfg.max_new_tokens)}]")
    if cfg.samples_per_prompt is not None:
        args.append(f"options.samples_per_prompt={cfg.samples_per_prompt}")
    if cfg.prompts_per_step is not None:
        args.append(f"options.prompts_per_step={cfg.prompts_per_step}")
    if cfg.weights is not None:
        args.append("options.weights={" + ", ".join(f"{k}: {v:g}" for k, v in cfg.weights.items()) + "}")
    if cfg.length_target is not None:
        args.append(f"options.term_options={{length: {{target: {cfg.length_target}, unit: tokens}}}}")
    return args


def _records(run: Path, kind: str) -> list[dict[str, Any]]:
    from neuroplastic.training.metrics import read_metrics

    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == kind]


def train_arm(cfg: BenchConfig, base: Path, lam: float, seed: int, out: Path, steps: int) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    args = arm_args(cfg, base, lam, seed, out, steps)
    t0 = time.perf_counter()
    _cli(args)
    seconds = time.perf_counter() - t0
    train = _records(out, "train")
    control = _records(out, "control")
    tokens = cfg.batch * cfg.block
    step_s = [tokens / r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    # the reward of the sampled training generations and their length, per curriculum stage
    stages: dict[str, dict[str, list[float]]] = {}
    for r in control:
        st = stages.setdefault(str(int(r["max_new_tokens"])), {"reward": [], "gen_len": []})
        st["reward"].append(r["reward"])
        st["gen_len"].append(r["gen_len"])
    return {
        "run": str(out), "seconds": seconds, "step_s": step_s,
        "stages": {k: {m: _mean(v) for m, v in st.items()} for k, st in stages.items()},
        "final_ce": train[-1]["loss"] if train else math.nan,
    }


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan


def evaluate_seed(cfg: BenchConfig, reward_run: Path, ce_run: Path, out_json: Path) -> dict[str, Any]:
    """``neuroplastic evaluate REWARD --task rewards --compare CE`` on held-out prompts
    (``eval_mode="batched"``: the same prompts and reward, generated in-process in batches)."""
    if cfg.eval_mode == "batched":
        cols = evaluate_batched(cfg, reward_run, ce_run)
        out_json.write_text(json.dumps(cols, indent=2), encoding="utf-8")
        return {"before": cols["before"], "reward": cols["after"], "ce": cols[Path(ce_run).name]}
    _cli(["evaluate", str(reward_run), "--task", "rewards", "--compare", str(ce_run),
          "--limit", str(cfg.eval_limit), "--max-new-tokens", str(cfg.eval_max_new),
          "--output", str(out_json), "--device", cfg.device])
    cols = json.loads(out_json.read_text(encoding="utf-8"))
    return {"before": cols["before"], "reward": cols["after"], "ce": cols[Path(ce_run).name]}


def held_out_pairs(run_cfg: Any, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """The ``n`` held-out (prompt, reference) pairs ``evaluate --task rewards`` scores (synthetic
    curriculum concepts that no reward during training saw), in the same order."""
    import numpy as np

    from neuroplastic.data.synthetic import STAGES, SyntheticCurriculum

    cur = SyntheticCurriculum(seed=run_cfg.data.synthetic_seed)
    stages = [s for s in (run_cfg.curriculum.stages or run_cfg.data.stages or STAGES) if s in STAGES]
    pairs = [p for s in (stages or STAGES) for p in cur.pairs(s, split="heldout")]
    idx = np.random.default_rng(seed).permutation(len(pairs))[:n]
    return [pairs[int(i)] for i in idx]


@torch.no_grad()
def greedy_batch(model: Any, tok: Any, prompts: list[str], max_new: int, device: str) -> list[list[int]]:
    """Greedy continuations (token ids, end-of-text cut off) of ``prompts``: one left-padded
    batch through Hugging Face ``generate`` for a HF model, one prompt at a time otherwise."""
    block = model.config.block_size
    encs = [tok.encode(p)[-max(1, block - max_new):] or [tok.eos_id] for p in prompts]
    hf = getattr(model, "model", None)
    if hf is not None and hasattr(hf, "generate"):
        width = max(len(e) for e in encs)
        ids = torch.full((len(encs), width), tok.eos_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(encs), width), dtype=torch.long, device=device)
        for i, e in enumerate(encs):
            ids[i, width - len(e):] = torch.tensor(e, device=device)
            mask[i, width - len(e):] = 1
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                          pad_token_id=tok.eos_id, eos_token_id=tok.eos_id)
        rows = out[:, width:].tolist()
    else:
        rows = [model.generate(torch.tensor([e], device=device), max_new, temperature=0.0,
                               eos_id=tok.eos_id)[0, len(e):].tolist() for e in encs]
    return [r[: r.index(tok.eos_id)] if tok.eos_id in r else r for r in rows]


_BEFORE: dict[str, dict[str, Any]] = {}  # the base model's column, per base (same every seed)


def _device(cfg: BenchConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def evaluate_batched(cfg: BenchConfig, reward_run: Path, ce_run: Path) -> dict[str, Any]:
    """Columns before / after / CE run as ``neuroplastic evaluate --task rewards --compare``
    gives them, generated in batches in this process (fast on a GPU)."""
    from neuroplastic.models import build_model
    from neuroplastic.models.loading import load_trained
    from neuroplastic.recipes.controlled_generation import reward_for

    dev = _device(cfg)
    model, tok, run_cfg, _ = load_trained(reward_run, device=dev)
    pairs = held_out_pairs(run_cfg, cfg.eval_limit)
    prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
    reward_fn = reward_for(run_cfg, tok)

    def column(m: Any) -> dict[str, Any]:
        rows = greedy_batch(m, tok, prompts, cfg.eval_max_new, dev)
        texts = [tok.decode(r) for r in rows]
        res = reward_fn(texts, refs)
        return {"total": float(res.total), "terms": {k: float(v) for k, v in res.terms.items()},
                "new_tokens": float(sum(map(len, rows)) / max(len(rows), 1)),
                "samples": [[p, t] for p, t in zip(prompts, texts)][: cfg.show]}

    key = str(run_cfg.model.hf.path or run_cfg.model)
    if key not in _BEFORE:
        torch.manual_seed(run_cfg.train.seed)
        before = build_model(run_cfg.model).to(dev).eval()
        _BEFORE[key] = column(before)
        del before
    cols = {"before": _BEFORE[key], "after": column(model)}
    del model
    other, _, _, _ = load_trained(ce_run, device=dev)
    cols[Path(ce_run).name] = column(other)
    del other
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    return cols


def print_seed_rows(seed: int, cols: dict[str, Any]) -> None:
    """One line per term (and total) as soon as a seed is evaluated."""
    from tqdm.auto import tqdm

    def print(line: str, flush: bool = True) -> None:  # noqa: A001 - above any progress bar
        tqdm.write(line)

    names = list(cols["reward"]["terms"]) + ["total"]

    def val(c: dict[str, Any], n: str) -> float:
        return float(c["total"] if n == "total" else c["terms"][n])

    for n in names:
        b, r, c = val(cols["before"], n), val(cols["reward"], n), val(cols["ce"], n)
        print(f"seed {seed} | {n:<20} | before {b:.4f} | reward arm {r:.4f} | CE-only {c:.4f} | "
              f"reward - CE {r - c:+.4f}", flush=True)
    print(f"seed {seed} | generated tokens     | before {cols['before'].get('new_tokens', math.nan):.1f} | "
          f"reward arm {cols['reward'].get('new_tokens', math.nan):.1f} | "
          f"CE-only {cols['ce'].get('new_tokens', math.nan):.1f}", flush=True)


# ----------------------------------------------------------------------------- the benchmark


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Base model, both arms per seed, evaluation; returns everything the table needs."""
    cfg.validate()
    cfg.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"config": _jsonable(dataclasses.asdict(cfg)), "load": [_load()]}
    if cfg.model:
        base = Path(cfg.model)
        result["base"] = {"kind": "given", "path": str(base)}
    else:
        init = build_init(cfg, cfg.out / "init")
        base = cfg.out / "pretrained"
        result["base"] = {"kind": f"built ({cfg.size})", "path": str(base),
                          "pretrain": pretrain(cfg, init, base)}
    result["params"] = _count_params(base)
    per_seed = []
    arms: dict[str, list[dict[str, Any]]] = {"reward": [], "ce": []}
    from tqdm.auto import tqdm

    bar = tqdm(total=3 * len(cfg.seeds), desc="fine-tunes + evaluations", unit="job",
               disable=not cfg.progress)
    for seed in cfg.seeds:
        runs = {}
        for arm, lam in (("reward", cfg.lam), ("ce", 0.0)):
            runs[arm] = cfg.out / f"seed{seed}-{'cg' if arm == 'reward' else 'ce-only'}"
            arms[arm].append(train_arm(cfg, base, lam, seed, runs[arm], cfg.steps))
            bar.update(1)
        per_seed.append(evaluate_seed(cfg, runs["reward"], runs["ce"], cfg.out / f"seed{seed}-rewards.json"))
        bar.update(1)
        print_seed_rows(seed, per_seed[-1])
    bar.close()
    result["arms"] = arms
    result["per_seed"] = per_seed
    result["summary"] = summarise(per_seed)
    result["png"] = str(plot(result["summary"], cfg.out / "controlled_generation.png", cfg))
    result["load"].append(_load())
    (cfg.out / "results.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return result


def docs_part(cfg: BenchConfig) -> tuple[str, str]:
    """(section part, PNG name): a given model's results live beside the built model's."""
    return ("real-model-table", "controlled_generation_real.png") if cfg.model else (
        "reward-table", "controlled_generation.png")


def write_outputs(result: dict[str, Any], cfg: BenchConfig, command: str) -> Path:
    """``results.md`` (the docs part, with the PNG beside it) in ``cfg.out``."""
    part, png_name = docs_part(cfg)
    png = cfg.out / png_name
    if Path(result["png"]).resolve() != png.resolve():
        shutil.copyfile(result["png"], png)
    md = cfg.out / "results.md"
    md.write_text(f"<!-- part:{part} -->\n" + results_markdown(result, cfg, command, png_name), encoding="utf-8")
    return md


def docs_from(folder: Path, doc: Path = DOCS) -> str:
    """Put a run's ``results.md`` (+ its PNG) from ``folder`` into the docs section."""
    md = folder / "results.md"
    if not md.is_file():
        raise UserError(f"{folder} has no results.md; give the --out folder of a finished run.")
    first, body = md.read_text(encoding="utf-8").split("\n", 1)
    part = first.removeprefix("<!-- part:").removesuffix(" -->").strip()
    for png in folder.glob("controlled_generation*.png"):
        shutil.copyfile(png, doc.parent / png.name)
    write_part(part, body, doc=doc, intro=INTRO)
    return part


def run_timing(cfg: BenchConfig) -> dict[str, Any]:
    """Wall time per fine-tuning step of each arm (``cfg.time_steps`` steps each)."""
    cfg.validate()
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.model:
        base, kind = Path(cfg.model), "given"
    else:
        base, kind = build_init(cfg, cfg.out / "init"), f"built ({cfg.size}), randomly initialised"
    out: dict[str, Any] = {"config": _jsonable(dataclasses.asdict(cfg)), "base": kind,
                           "params": _count_params(base), "arms": {}, "load": [_load()]}
    for arm, lam in (("reward", cfg.lam), ("ce", 0.0)):
        run = cfg.out / f"time-{arm}"
        r = train_arm(cfg, base, lam, cfg.seeds[0], run, cfg.time_steps)
        # group the step times by the stage's generation length (the control records say it)
        length = {c["step"]: int(c["max_new_tokens"]) for c in _records(run, "control")}
        steps = [t["step"] for t in _records(run, "train") if t.get("tokens_per_s")]
        groups: dict[str, list[float]] = {}
        for step, dt in zip(steps, r["step_s"]):
            groups.setdefault(str(length.get(step, 0)), []).append(dt)
        first = str(length.get(steps[0], 0)) if steps else ""
        if len(groups.get(first, [])) > 1:
            groups[first] = groups[first][1:]  # the run's first step pays one-off warm-up
        out["arms"][arm] = {"by_stage": {k: statistics.median(v) for k, v in groups.items()},
                            "all_step_s": r["step_s"], "seconds": r["seconds"]}
        shutil.rmtree(run, ignore_errors=True)  # full-size checkpoints
    out["load"].append(_load())
    (cfg.out / "timing.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    return out


def _load() -> float | None:
    """The 1-minute load average (how shared the machine was), where the OS has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _load_txt(record: dict[str, Any]) -> str:
    load = [x for x in record.get("load", []) if x is not None]
    return f"; 1-min load average at start / end: {' / '.join(f'{x:.2f}' for x in load)}" if load else ""


def _count_params(path: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
    return sum(p.numel() for p in m.parameters())


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per term (and total): before, reward arm, CE arm (mean, 95% CI) and paired reward - CE."""
    from neuroplastic.evaluation.ablation import mean_ci, verdict

    names = list(per_seed[0]["reward"]["terms"]) + ["total"]

    def val(col: dict[str, Any], n: str) -> float:
        return float(col["total"] if n == "total" else col["terms"][n])

    rows = {}
    for n in names:
        before = [val(s["before"], n) for s in per_seed]
        rew = [val(s["reward"], n) for s in per_seed]
        ce = [val(s["ce"], n) for s in per_seed]
        diff = [a - b for a, b in zip(rew, ce)]
        d_m, d_h = mean_ci(diff)
        rows[n] = {"before": mean_ci(before), "reward": mean_ci(rew), "ce": mean_ci(ce),
                   "diff": (d_m, d_h), "verdict": verdict(d_m, d_h, True),
                   "values": {"before": before, "reward": rew, "ce": ce}}
    lengths = {k: [float(sd[k].get("new_tokens", math.nan)) for sd in per_seed] for k in ("before", "reward", "ce")}
    new_tokens = {k: mean_ci(v) for k, v in lengths.items()}
    new_tokens["diff"] = mean_ci([a - b for a, b in zip(lengths["reward"], lengths["ce"])])
    return {"seeds": len(per_seed), "rows": rows, "new_tokens": new_tokens}


COLUMNS = ["term", "before (base)", "controlled-generation", "CE-only (lam=0)", "reward - CE", "verdict"]


def _fmt(m: float, h: float, digits: int = 4) -> str:
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.{digits}f} ± {h:.{digits}f}" if math.isfinite(h) else f"{m:.{digits}f}"


def _fmt_before(m: float, h: float, digits: int = 4) -> str:
    # the base model and its greedy continuations are the same for every seed: no spread
    return _fmt(m, h if h else math.nan, digits)


def table(summary: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for n, r in summary["rows"].items():
        verdict = r["verdict"] if summary["seeds"] > 1 else "(1 seed: no CI)"
        lines.append(f"| {n} | {_fmt_before(*r['before'])} | {_fmt(*r['reward'])} | {_fmt(*r['ce'])} | "
                     f"{_fmt(*r['diff'])} | {verdict} |")
    nt = summary.get("new_tokens")
    if nt:  # not a reward: how long the continuations are (what the length term scores)
        cells = " | ".join([_fmt_before(*nt["before"], digits=1)]
                           + [_fmt(*nt[k], digits=1) for k in ("reward", "ce", "diff")])
        lines.append(f"| generated tokens (not a reward) | {cells} | |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path, cfg: BenchConfig) -> Path:
    from neuroplastic.evaluation.rewards_eval import plot_components

    rows = summary["rows"]
    terms = [n for n in rows if n != "total"]

    def col(key: str) -> dict[str, Any]:
        return {"terms": {n: rows[n][key][0] for n in terms}, "total": rows["total"][key][0]}

    seeds = summary["seeds"]
    return plot_components(
        {"before (base)": col("before"), f"controlled-generation (lam={cfg.lam:g})": col("reward"),
         "CE-only (lam=0)": col("ce")},
        path,
        title=f"held-out prompts, mean over {seeds} seed{'s' if seeds > 1 else ''}",
    )


def sentence(summary: dict[str, Any], cfg: BenchConfig) -> str:
    """What the numbers say, without claiming more than they support."""
    rows, seeds = summary["rows"], summary["seeds"]
    tot = rows["total"]
    d, h = tot["diff"]
    moved = tot["reward"][0] - tot["before"][0], tot["ce"][0] - tot["before"][0]
    text = (f"Against the base model the total reward moved by {moved[0]:+.4f} with the reward loss "
            f"and by {moved[1]:+.4f} with CE only. ")
    if seeds < 2:
        return text + (f"The reward arm minus the CE-only arm is {d:+.4f} on the total, from one seed: "
                       "no confidence interval, so this is no evidence either way.")
    helped = [n for n, r in rows.items() if r["verdict"] == "helps"]
    hurt = [n for n, r in rows.items() if r["verdict"] == "hurts"]
    text += (f"Reward arm minus CE-only arm on the total: {d:+.4f} ± {h:.4f} (95% CI over {seeds} "
             f"seeds, paired), i.e. {tot['verdict']}")
    text += "." if tot["verdict"] != "no detectable effect" else (
        ": within this budget the reward loss did not move the rewards beyond what the CE "
        "fine-tune (with the same reward-modulated eligibility traces) did.")
    if helped or hurt:
        text += (" Terms whose CI excludes 0: "
                 + ", ".join([f"{n} (higher)" for n in helped] + [f"{n} (lower)" for n in hurt]) + ".")
    nt = summary.get("new_tokens", {}).get("diff")
    if nt and math.isfinite(nt[0]):
        text += (f" The reward arm's held-out continuations are {nt[0]:+.1f} ± {nt[1]:.1f} tokens "
                 f"longer than the CE-only arm's (of at most {cfg.eval_max_new}).")
    return text


# ----------------------------------------------------------------------------- docs


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = (f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
           else f"CPU {cpu} ({os.cpu_count()} cores, torch threads: {torch.get_num_threads()})")
    import transformers

    return (f"{dev}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"python {platform.python_version()}; {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC")


def results_markdown(result: dict[str, Any], cfg: BenchConfig, command: str, png_name: str) -> str:
    base = result["base"]
    pre = base.get("pretrain")
    if pre:
        base_txt = (f"a GPT-2-architecture model built from a GPT2Config ({cfg.size}: "
                    f"{result['params'] / 1e6:.1f}M parameters) with a BPE tokenizer trained on the "
                    f"synthetic curriculum, pre-trained with CE for {pre['steps']} steps x "
                    f"{cfg.pretrain_batch} x {cfg.block} tokens on the whole curriculum "
                    f"(validation loss {pre['val_loss']:.3f} nats/token, {pre['seconds'] / 60:.1f} min), "
                    "exported with save_pretrained and loaded back with `model=PATH`")
    else:
        base_txt = f"the local model `{base['path']}` ({result['params'] / 1e6:.1f}M parameters)"
    arms = result["arms"]
    opts = []
    if cfg.max_new_tokens is not None:
        opts.append(f"max_new_tokens {cfg.max_new_tokens}")
    if cfg.samples_per_prompt is not None:
        opts.append(f"samples_per_prompt {cfg.samples_per_prompt}")
    if cfg.prompts_per_step is not None:
        opts.append(f"prompts_per_step {cfg.prompts_per_step}")
    if cfg.weights is not None:
        opts.append(f"weights {cfg.weights}")
    if cfg.length_target is not None:
        opts.append(f"length target {cfg.length_target} tokens")
    opt_txt = ", ".join(opts) if opts else "the recipe's defaults"
    lengths = sorted({int(k) for a in arms.values() for x in a for k in x["stages"]})
    train_rows = [
        "| arm | " + " | ".join(f"stage {n} tok: reward / tokens" for n in lengths) + " | final CE | min / run |",
        "|---|" + "---|" * (len(lengths) + 2),
    ]
    for arm, label in (("reward", f"controlled-generation (lam={cfg.lam:g})"), ("ce", "CE-only (lam=0)")):
        a = arms[arm]
        cells = []
        for n in lengths:
            got = [x["stages"][str(n)] for x in a if str(n) in x["stages"]]
            cells.append(f"{_mean([g['reward'] for g in got]):.4f} / {_mean([g['gen_len'] for g in got]):.1f}")
        train_rows.append(f"| {label} | " + " | ".join(cells) + f" | {_mean([x['final_ce'] for x in a]):.4f} | "
                          f"{_mean([x['seconds'] / 60 for x in a]):.1f} |")
    seeds = ", ".join(str(s) for s in cfg.seeds)
    asked = [int(n) for n in _opt(cfg, "max_new_tokens")]
    cap_note = ""
    if lengths and lengths != sorted(asked)[: len(lengths)]:
        cap_note = (f" (the recipe asks for {'/'.join(map(str, asked))} new tokens per stage; it keeps a "
                    f"quarter of the {cfg.block}-token context for the prompt, so the stages generated at "
                    f"most {'/'.join(map(str, lengths))})")
    return (
        f"Command: `{command}`  \n"
        f"Machine: {_machine()}{_load_txt(result)}\n\n"
        + f"Base model: {base_txt}. Each arm: `neuroplastic train controlled-generation model=BASE` "
        f"for {cfg.steps} steps x {cfg.batch} x {cfg.block} tokens, lr {cfg.lr:g}, "
        f"{'LoRA r=' + str(cfg.lora) if cfg.lora else 'full fine-tune'}, recipe options: {opt_txt}; "
        f"the reward arm has `options.lam={cfg.lam:g}`, the CE-only arm `options.lam=0` and is otherwise "
        f"identical (same seed, data order and reward-modulated eligibility traces). Seeds: {seeds}. "
        f"Length term: target {_length_txt(cfg)}. "
        + (f"Evaluation: `neuroplastic evaluate REWARD_RUN --task rewards --compare CE_RUN --limit "
           f"{cfg.eval_limit} --max-new-tokens {cfg.eval_max_new}`" if cfg.eval_mode == "cli" else
           f"Evaluation: the prompts and reward of `neuroplastic evaluate REWARD_RUN --task rewards "
           f"--compare CE_RUN --limit {cfg.eval_limit} --max-new-tokens {cfg.eval_max_new}`, generated "
           "in one left-padded greedy batch per model (`--eval-mode batched`)")
        + " -- greedy continuations of "
        f"{cfg.eval_limit} prompts of concepts held out of the reward loss (definitions, "
        "explanations, dialogues); \"before\" is the base model.\n\n"
        f"{table(result['summary'])}\n\n"
        f"(mean ± 95% CI over seeds; reward - CE paired by seed.)\n\n"
        "During training (mean over seeds and over the steps of each curriculum stage, named by its "
        f"generation cap{cap_note}): the reward of the sampled generations on training prompts, and "
        "their length in tokens.\n\n"
        + "\n".join(train_rows) + "\n\n"
        f"![reward components before / after, reward loss vs CE-only]({png_name})\n\n"
        f"What it shows: {sentence(result['summary'], cfg)}\n"
        + side_by_side(result, cfg)
    )


def _cell(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= n else text[: n - 1] + "…"
    return text.replace("|", "\\|") or "(empty)"


def side_by_side(result: dict[str, Any], cfg: BenchConfig) -> str:
    """Greedy continuations of the first held-out prompts by each model (the first seed)."""
    per = result.get("per_seed") or []
    if not per or not per[0]["reward"].get("samples"):
        return ""
    cols = per[0]
    n = min(len(cols[k].get("samples") or []) for k in ("before", "reward", "ce"))
    lines = ["", f"Generations side by side (seed {cfg.seeds[0]}, greedy, first {n} held-out prompts):", "",
             "| prompt | before (base) | controlled-generation | CE-only |", "|---|---|---|---|"]
    for i in range(n):
        prompt = cols["reward"]["samples"][i][0]
        lines.append(f"| {_cell(prompt, 80)} | " + " | ".join(
            _cell(cols[k]["samples"][i][1]) for k in ("before", "reward", "ce")) + " |")
    return "\n".join(lines) + "\n"


def timing_markdown(timing: dict[str, Any], cfg: BenchConfig, command: str, full_steps: int) -> str:
    arms = timing["arms"]
    lengths = sorted({int(k) for a in arms.values() for k in a["by_stage"]})
    head = "| arm | " + " | ".join(f"s / step, {n} new tokens" for n in lengths) + " |"
    lines = [head, "|---|" + "---|" * len(lengths)]
    for arm, label in (("reward", f"controlled-generation (lam={cfg.lam:g})"), ("ce", "CE-only (lam=0)")):
        by = arms[arm]["by_stage"]
        lines.append(f"| {label} | " + " | ".join(f"{by[str(n)]:.1f}" if str(n) in by else "-" for n in lengths) + " |")
    # stages are equal thirds of a run: the mean over stages is the mean step
    per_step = sum(_mean(list(a["by_stage"].values())) for a in arms.values())
    hours = per_step * full_steps / 3600
    asked = [int(n) for n in _opt(cfg, "max_new_tokens")]
    cap = ""
    if lengths != sorted(asked)[: len(lengths)]:
        cap = (f" (the recipe asks for {'/'.join(map(str, asked))}; it keeps a quarter of the "
               f"{cfg.block}-token context for the prompt)")
    return (
        f"Cost of a GPT-2-size run here. Command: `{command}`  \n"
        f"Machine: {_machine()}{_load_txt(timing)}\n\n"
        f"{timing['base']}: {timing['params'] / 1e6:.1f}M parameters (GPT2Config 12 layers x 768, "
        f"vocabulary 50257 rows); batch {cfg.batch} x {cfg.block} tokens, "
        f"{'LoRA r=' + str(cfg.lora) if cfg.lora else 'full fine-tune'}, "
        f"{_opt(cfg, 'samples_per_prompt')} samples x {_opt(cfg, 'prompts_per_step')} prompts per step; "
        f"{cfg.time_steps} steps per arm spread over the three curriculum stages (generation length "
        f"{', '.join(str(n) for n in lengths)} tokens{cap}), median wall time per step of each stage "
        "(the run's first step, which pays one-off warm-up, left out where its stage has another; the "
        "reward arm runs first, so its first step also loads the sentence-embedding model and WordNet). "
        "A random model never emits end-of-text, so every sample runs to the stage's full length: an "
        "upper bound for a pretrained model, which stops earlier. The CE-only arm still samples and "
        "scores generations every step (same recipe, lam = 0); it skips only the backward pass of the "
        "reward loss. On a shared 2-core CPU single steps are noisy: read these as rough costs.\n\n"
        + "\n".join(lines) + "\n\n"
        f"At this speed the recipe's {full_steps}-step run of both arms would take about {hours:.1f} h "
        "per seed on this machine. A run with real pretrained GPT-2 weights awaits a machine that has "
        "them (and preferably a GPU): `python benchmarks/controlled_generation.py --model /path/to/gpt2 "
        "--lr 5e-5 --block 256 --steps 300 --write-docs` (block 256 lets the last stage generate the full 150 tokens).\n"
    )


def _length_txt(cfg: BenchConfig) -> str:
    if cfg.length_target is not None:
        return f"{cfg.length_target} tokens"
    from neuroplastic.config import load_config

    lo = dict((load_config("controlled-generation").options.get("term_options") or {}).get("length") or {})
    return f"{lo.get('target', 30)} {lo.get('unit', 'words')}"


def _opt(cfg: BenchConfig, name: str) -> Any:
    """A recipe option as the fine-tunes use it: the override, else the recipe's value."""
    value = getattr(cfg, name)
    if value is not None:
        return value
    from neuroplastic.config import load_config

    return load_config("controlled-generation").options[name]


def write_part(part: str, body: str, doc: Path = DOCS, intro: str = "") -> None:
    """Replace (or add) ``part`` inside this benchmark's section of ``doc``."""
    _docs.write_part(doc, KEY, part, body, intro=intro)


INTRO = (
    "## controlled-generation: reward loss vs CE-only (benchmarks/controlled_generation.py)\n\n"
    "Issue 6, build item 5: reward components (length, semantic similarity, BLEU, METEOR and their "
    "weighted total) of greedy generations on held-out prompts, before fine-tuning and after it with "
    "the controlled-generation recipe (CE + lam * REINFORCE reward loss) vs a CE-only fine-tune of the "
    "same budget.\n\n"
)


# ----------------------------------------------------------------------------- CLI


def build_config(argv: list[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    """The benchmark's configuration from command-line arguments (UserError on bad values)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="local HF causal LM directory (skips building and pre-training)")
    ap.add_argument("--size", default="small", choices=[s for s in SIZES if s != "micro"])
    ap.add_argument("--out", default="runs/bench-controlled-generation")
    ap.add_argument("--pretrain-steps", type=int, default=BenchConfig.pretrain_steps)
    ap.add_argument("--pretrain-lr", type=float, default=BenchConfig.pretrain_lr)
    ap.add_argument("--steps", type=int, default=BenchConfig.steps)
    ap.add_argument("--batch", type=int, default=BenchConfig.batch)
    ap.add_argument("--block", type=int, default=BenchConfig.block)
    ap.add_argument("--lr", type=float, default=BenchConfig.lr)
    ap.add_argument("--lam", type=float, default=BenchConfig.lam)
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tune)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--max-new-tokens", default="", help="per curriculum stage, e.g. 30,80,150 (default: recipe)")
    ap.add_argument("--samples-per-prompt", type=int, default=None)
    ap.add_argument("--prompts-per-step", type=int, default=None)
    ap.add_argument("--length-target", type=int, default=None,
                    help="the length term's target in tokens (default: the recipe's 20 tokens)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (both arms and evaluation)")
    ap.add_argument("--eval-mode", default="cli", choices=["cli", "batched"],
                    help="batched: generate the held-out continuations in one batch per model (GPU)")
    ap.add_argument("--docs-from", default="",
                    help="put the results.md + PNG of a finished run's --out folder into the docs, and stop")
    ap.add_argument("--eval-limit", type=int, default=BenchConfig.eval_limit)
    ap.add_argument("--eval-max-new", type=int, default=BenchConfig.eval_max_new)
    ap.add_argument("--time-steps", type=int, default=0,
                    help="only time N fine-tuning steps of each arm (no pre-training, no evaluation)")
    ap.add_argument("--full-steps", type=int, default=300,
                    help="--time-steps: the run length to extrapolate to (the recipe's 300)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default; 1 is steadier on a shared CPU)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: a microscopic model and a few steps (seconds); not a result")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:  # every knob at smoke size; the numbers mean nothing
        args.size, args.pretrain_steps, args.steps, args.batch, args.block = "micro", 4, 3, 2, 32
        args.seeds, args.max_new_tokens, args.samples_per_prompt, args.prompts_per_step = "0,1", "6", 2, 1
        args.length_target = args.length_target or 4
        args.eval_limit, args.eval_max_new = 4, 6
        args.time_steps = min(args.time_steps, 3)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        max_new = [int(s) for s in args.max_new_tokens.split(",") if s.strip()] or None
    except ValueError:
        raise UserError("--seeds and --max-new-tokens take comma-separated integers, e.g. 0,1,2.") from None
    cfg = BenchConfig(
        out=Path(args.out), model=args.model, size=args.size, pretrain_steps=args.pretrain_steps,
        pretrain_lr=args.pretrain_lr, steps=args.steps, batch=args.batch, block=args.block, lr=args.lr,
        lam=args.lam, seeds=seeds, lora=args.lora, max_new_tokens=max_new,
        samples_per_prompt=args.samples_per_prompt, prompts_per_step=args.prompts_per_step,
        eval_limit=args.eval_limit, eval_max_new=args.eval_max_new, time_steps=args.time_steps,
        length_target=args.length_target, device=args.device, eval_mode=args.eval_mode,
    )
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    command = "python benchmarks/controlled_generation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        cfg, args = build_config(argv)
        if args.docs_from:
            part = docs_from(Path(args.docs_from))
            print(f"wrote part {part!r} of the controlled-generation section of {DOCS}")
            return 0
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.time_steps:
            timing = run_timing(cfg)
            print(json.dumps(timing["arms"], indent=2))
            if args.write_docs:
                write_part("gpt2-timing", timing_markdown(timing, cfg, command.strip(), args.full_steps),
                           intro=INTRO)
            return 0
        result = run_benchmark(cfg)
    except UserError as exc:
        print(f"controlled_generation.py: error: {exc}", file=sys.stderr)
        return 2
    print(table(result["summary"]))
    print(sentence(result["summary"], cfg))
    md = write_outputs(result, cfg, command.strip())
    print(f"table + generations: {md}; PNG: {cfg.out / docs_part(cfg)[1]}; "
          f"put them into the docs with: python benchmarks/controlled_generation.py --docs-from {cfg.out}")
    if args.write_docs:
        docs_from(cfg.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
