"""Statistics and report of an ablation: with vs without a rule, over several seeds.

For each metric: the mean and 95% confidence interval (Student t) of each arm, the
paired difference (with - without, paired by seed) with its 95% CI, and a verdict:

- ``helps``: the CI of the paired difference excludes 0 on the metric's good side;
- ``hurts``: it excludes 0 on the bad side;
- ``no detectable effect``: the CI contains 0 (or fewer than 2 seeds).

Nothing is claimed beyond what the interval supports: with 3 seeds the t quantile is
4.30, so only large, consistent effects are detected. Nor is anything claimed on evidence
that is not there: a run that was interrupted or failed is marked (:class:`ArmRun`) and
leaves its seed out, and while any seed is incomplete no metric gets a verdict
(:func:`no_verdict_incomplete`); a mechanism that never acted in its runs gets
:data:`NOT_ACTED` instead of a verdict (its arms can only differ by chance).
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# two-sided 95% Student t quantiles t_{0.975, df}
_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
    9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
    17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064,
    25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000,
    120: 1.980,
}


def t_quantile(df: int) -> float:
    """t_{0.975, df} (scipy when installed, else a table, conservative between entries)."""
    if df < 1:
        return float("nan")
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        pass
    # between table entries use the smaller df (a slightly wider, conservative interval)
    return _T975[max(k for k in _T975 if k <= df)]


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% CI); half-width is nan for fewer than 2 values."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, t_quantile(n - 1) * math.sqrt(var / n)


#: a file in an ablation's output directory while it has runs that did not complete
INCOMPLETE_MARK = "ablation.incomplete"


def begin_ablation(out: Path) -> bool:
    """Mark ``out`` as holding an unfinished ablation; True when an earlier one was left
    unfinished there (its completed runs may then be kept: the ablation resumes). After a
    complete ablation the same command starts over, so a changed code base is measured anew."""
    mark = Path(out) / INCOMPLETE_MARK
    resuming = mark.is_file()
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text("An ablation is running here or did not complete; the same command continues it.\n",
                    encoding="utf-8")
    return resuming


def end_ablation(out: Path, complete: bool) -> None:
    if complete:
        (Path(out) / INCOMPLETE_MARK).unlink(missing_ok=True)


#: the verdict of a mechanism that never acted in the runs of the arm that has it
NOT_ACTED = "did not act in this budget"


def no_verdict_incomplete(complete: int, total: int) -> str:
    """The verdict while only ``complete`` of ``total`` seeds have all their runs complete."""
    return f"no verdict: {complete} of {total} seeds complete"


def verdict(diff_mean: float, half: float, higher_is_better: bool) -> str:
    if not math.isfinite(half) or not math.isfinite(diff_mean):
        return "no detectable effect"
    lo, hi = diff_mean - half, diff_mean + half
    if lo > 0:
        return "helps" if higher_is_better else "hurts"
    if hi < 0:
        return "hurts" if higher_is_better else "helps"
    return "no detectable effect"


@dataclass
class MetricSummary:
    name: str
    higher_is_better: bool
    without: list[float]
    with_: list[float]
    without_mean: float = 0.0
    without_ci: float = 0.0
    with_mean: float = 0.0
    with_ci: float = 0.0
    diff_mean: float = 0.0
    diff_ci: float = 0.0
    verdict: str = ""

    def compute(self) -> MetricSummary:
        self.without_mean, self.without_ci = mean_ci(self.without)
        self.with_mean, self.with_ci = mean_ci(self.with_)
        diffs = [b - a for a, b in zip(self.without, self.with_)]
        self.diff_mean, self.diff_ci = mean_ci(diffs)
        self.verdict = verdict(self.diff_mean, self.diff_ci, self.higher_is_better)
        return self


class StopSignals:
    """Which signal (SIGINT / SIGTERM) interrupted an ablation, if any (``signum``).

    Inside ``with StopSignals() as sig:`` the first signal is only recorded (the ablation
    stops at its next check); a second Ctrl-C raises ``KeyboardInterrupt``. When a run
    installs its own handler (the trainer's: finish the step, save, stop), :meth:`chain`
    wraps it so that the signal's number is recorded too (for the exit code) before that
    handler sees it. ``exit_code``: 128 + the signal's number (130 Ctrl-C, 143 SIGTERM).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum) if self.signum is not None else 130

    def chain(self) -> None:
        """Record the signal before the handler now installed (the trainer's) sees it."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            current = signal.getsignal(sig)
            if not callable(current) or current == self._handler or getattr(current, "ablate_chain", False):
                continue

            def wrapper(signum, frame, _inner=current):
                self.signum = signum
                _inner(signum, frame)

            wrapper.ablate_chain = True  # type: ignore[attr-defined]
            signal.signal(sig, wrapper)


@dataclass
class ArmRun:
    """One training run of an ablation: its seed, arm, whether it ran its whole budget,
    its final metrics and how many steps each ablated mechanism acted on."""

    seed: int
    arm: str
    status: str = "not run"  # complete | interrupted | failed | not run
    step: int = 0
    max_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    acted: dict[str, int] = field(default_factory=dict)
    detail: str = ""

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def describe(self) -> str:
        """``complete``, ``interrupted at step 36 of 60``, ``failed at step 3 of 60: ...``."""
        if self.status in ("complete", "not run"):
            return self.status
        text = f"{self.status} at step {self.step} of {self.max_steps}"
        return f"{text}: {self.detail}" if self.detail else text


@dataclass
class AblationReport:
    title: str
    rules: list[str]
    seeds: list[int]
    metrics: list[MetricSummary] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runs: list[ArmRun] = field(default_factory=list)
    #: 0 when every run completed; 130 / 143 when the ablation was interrupted; 1 when a
    #: run failed
    exit_code: int = 0

    def complete_seeds(self) -> list[int]:
        """Seeds whose runs (every arm) all completed; every seed when no runs are recorded."""
        if not self.runs:
            return list(self.seeds)
        return [s for s in self.seeds if all(r.complete for r in self.runs if r.seed == s)]

    def status_line(self) -> str:
        done = self.complete_seeds()
        line = f"Runs: {len(done)} of {len(self.seeds)} seeds complete"
        bad = [r for r in self.runs if not r.complete]
        if bad:
            line += "; " + "; ".join(f"seed {r.seed} {r.arm}: {r.describe()}" for r in bad)
            line += (". Incomplete seeds are left out of the statistics and no verdict is given; "
                     "run the same command again to continue the interrupted runs from their checkpoints.")
        else:
            line += "."
        return line

    def runs_table(self) -> list[str]:
        if not self.runs:
            return []
        names = sorted({k for r in self.runs for k in r.acted})
        head = "| seed | arm | status | steps |" + "".join(f" {n} acted (steps) |" for n in names)
        lines = [head, "|---" * (4 + len(names)) + "|"]
        for r in self.runs:
            acted = "".join(f" {r.acted[n]} |" if n in r.acted else " – |" for n in names)
            lines.append(f"| {r.seed} | {r.arm} | {r.describe()} | {r.step} of {r.max_steps} |{acted}")
        return lines

    def markdown(self) -> str:
        def f(m: float, h: float) -> str:
            if not math.isfinite(m):
                return "n/a"
            return f"{m:.4f} ± {h:.4f}" if math.isfinite(h) else f"{m:.4f}"

        lines = [
            f"### {self.title}",
            "",
            f"Rules ablated: {', '.join(self.rules)}; seeds: {', '.join(map(str, self.seeds))} "
            "(mean ± 95% CI, Student t; difference = with − without, paired by seed).",
            "",
        ]
        if self.metrics:
            lines += ["| metric | better | without | with | difference | verdict |", "|---|---|---|---|---|---|"]
        else:
            lines.append("No seed has all its runs complete: no statistics and no verdict yet.")
        for m in self.metrics:
            lines.append(
                f"| {m.name} | {'higher' if m.higher_is_better else 'lower'} | "
                f"{f(m.without_mean, m.without_ci)} | {f(m.with_mean, m.with_ci)} | "
                f"{f(m.diff_mean, m.diff_ci)} | {m.verdict} |"
            )
        if self.runs:
            lines += ["", self.status_line(), "", *self.runs_table()]
        for n in self.notes:
            lines += ["", n]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "rules": self.rules,
            "seeds": self.seeds,
            "complete_seeds": self.complete_seeds(),
            "metrics": [m.__dict__ for m in self.metrics],
            "notes": self.notes,
            "runs": [dict(r.__dict__) for r in self.runs],
            "exit_code": self.exit_code,
        }

    def plot(self, path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.metrics)
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6), dpi=110, squeeze=False)
        for ax, m in zip(axes[0], self.metrics):
            for a, b in zip(m.without, m.with_):
                ax.plot([0, 1], [a, b], "-o", color="0.7", lw=1, ms=3)
            for x, mean, ci in ((0, m.without_mean, m.without_ci), (1, m.with_mean, m.with_ci)):
                ax.errorbar([x], [mean], yerr=[ci if math.isfinite(ci) else 0], fmt="s",
                            color="C0" if x == 0 else "C1", capsize=5, ms=7)
            ax.set_xticks([0, 1], ["without", "with"])
            ax.set_xlim(-0.4, 1.4)
            ax.set_title(f"{m.name}\n{m.verdict}", fontsize=9)
            ax.grid(alpha=0.3)
        fig.suptitle(self.title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return Path(path)
