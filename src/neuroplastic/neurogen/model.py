"""``NeuroGenModel``: the seed's Python API over :class:`neuroplastic.models.brain.Brain`.

::

    from neuroplastic.neurogen import NeuroGenModel

    model = NeuroGenModel(vocab_size=50257, embedding_dim=512, gpu_device=0)
    loss = model.train_step(input_ids=[1, 2, 3, 4], target_ids=[2, 3, 4, 5])
    new_ids = model.generate(prompt_token_ids=[1, 2, 3], max_length=100, temperature=1.0)
    model.save_checkpoint("brain.ckpt")        # brain.ckpt (safetensors) + brain.ckpt.json
    model.load_checkpoint("brain.ckpt")
    stats = model.get_statistics()

``gpu_device=0`` (the default, as in the seed) uses CUDA device 0 and falls back to the CPU
with a warning when CUDA is not available; ``gpu_device=-1`` means the CPU. Any other
keyword is a :class:`~neuroplastic.models.brain.BrainConfig` field (``scale=1/16``,
``hippocampus=False``, ``activity="lif"``, ``lr=1e-3``, ...).

A training step (``train_step``) on token sequences ``(B, T)`` (one sequence as a list or
1-D tensor, or a batch of equally long ones; every stream starts from a fresh brain state):

1. the brain runs the five-phase cycle over all tokens of all streams (no gradient);
2. the readout's next-token cross-entropy is back-propagated into the readout and the
   token embeddings, and AdamW takes a step (gradient clipped to ``grad_clip``);
3. the per-token reward ``-CE`` becomes dopamine (reward-prediction error against the
   running baseline), and the brain's rules update its synapses: three-factor plasticity,
   tagging and capture, homeostatic scaling (:mod:`neuroplastic.models.brain_rules`);
4. the sequences join the replay buffer; every ``replay_interval`` steps a replay of stored
   episodes consolidates (learning from them again, with capture forced).

The returned loss is the mean cross-entropy of the step's predictions (before its updates).
Bad input (a token id outside ``[0, vocab_size)``, input and target of different shapes, an
empty sequence, a checkpoint of a different size) raises
:class:`~neuroplastic.errors.UserError` with one sentence.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from neuroplastic.config import build_dataclass
from neuroplastic.errors import UserError
from neuroplastic.models.brain import MECHANISMS, MODULES, Activity, Brain, BrainConfig
from neuroplastic.models.brain_rules import (
    Dopamine,
    HippocampalReplay,
    SynapticScaling,
    SynapticTagging,
    ThreeFactor,
    lookahead,
)
from neuroplastic.models.checkpoint_io import (
    flatten_state,
    load_safetensors,
    model_tensors,
    unflatten_state,
)
from neuroplastic.plasticity.consolidation import ReplayBuffer
from neuroplastic.plasticity.engine import RewardBaseline
from neuroplastic.training.optim import adamw

__all__ = ["CHECKPOINT_FORMAT", "NeuroGenModel", "make_config", "metadata_path"]

CHECKPOINT_FORMAT = "neuroplastic-neurogen"
FORMAT_VERSION = 1
_ACCURACY_ROWS = 512  # rows whose argmax is checked per step with the adaptive softmax
_LOGIT_CHUNK = 1 << 24  # logits computed at once (rows x vocab), bounds memory for big vocabularies


def metadata_path(path: str | os.PathLike) -> Path:
    """The JSON beside a checkpoint's weights: ``<path>.json`` (whatever extension ``path`` has)."""
    return Path(str(path) + ".json")


def make_config(vocab_size: Any, embedding_dim: Any, **overrides: Any) -> BrainConfig:
    """A validated :class:`BrainConfig`; unknown keys and wrong types raise UserError."""
    for name, value in (("vocab_size", vocab_size), ("embedding_dim", embedding_dim)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise UserError(f"{name} must be an integer, got {value!r}.")
    values = {"vocab_size": int(vocab_size), "embedding_dim": int(embedding_dim), **overrides}
    return build_dataclass(BrainConfig, values).validate()


def _pick_device(gpu_device: Any) -> torch.device:
    if isinstance(gpu_device, bool) or not isinstance(gpu_device, int | np.integer):
        raise UserError(f"gpu_device must be an integer (a CUDA device index, or -1 for the CPU), got {gpu_device!r}.")
    gpu_device = int(gpu_device)
    if gpu_device == -1:
        return torch.device("cpu")
    if gpu_device < -1:
        raise UserError(f"gpu_device must be -1 (CPU) or a CUDA device index >= 0, got {gpu_device}.")
    if not torch.cuda.is_available():
        warnings.warn(f"gpu_device={gpu_device} asked for CUDA, which is not available; NeuroGenModel runs on the CPU.",
                      stacklevel=3)
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if gpu_device >= n:
        raise UserError(f"gpu_device={gpu_device} does not exist (this machine has {n} CUDA device(s)); use 0..{n - 1} or -1.")
    return torch.device(f"cuda:{gpu_device}")


def _as_ids(ids: Any, name: str, vocab: int, allow_2d: bool = True) -> torch.Tensor:
    """Token ids as an int64 tensor (B, T); lists, tuples, numpy arrays or tensors."""
    if isinstance(ids, torch.Tensor):
        t = ids.detach().cpu()
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise UserError(f"{name} must hold integer token ids, got a {t.dtype} tensor.")
        t = t.to(torch.int64)
    elif isinstance(ids, np.ndarray):
        if not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"{name} must hold integer token ids, got a numpy array of {ids.dtype}.")
        t = torch.from_numpy(ids.astype(np.int64))
    elif isinstance(ids, Sequence) and not isinstance(ids, str | bytes):
        rows = list(ids)
        nested = [isinstance(r, Sequence | np.ndarray | torch.Tensor) and not isinstance(r, str | bytes) for r in rows]
        if any(nested):
            if not all(nested):
                raise UserError(f"{name} mixes token ids and sequences; give a list of ids or a list of equally long lists.")
            rows = [list(r.tolist() if isinstance(r, np.ndarray | torch.Tensor) else r) for r in rows]
            lengths = {len(r) for r in rows}
            if len(lengths) > 1:
                raise UserError(f"{name} holds sequences of different lengths {sorted(lengths)}; a batch needs equally long sequences.")
            flat = [v for r in rows for v in r]
        else:
            flat = rows
        for v in flat:
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise UserError(f"{name} must hold integer token ids, got {v!r}.")
        t = torch.tensor(rows if any(nested) else flat, dtype=torch.int64)
    else:
        raise UserError(f"{name} must be a list of token ids or an integer tensor, got {type(ids).__name__}.")
    if t.dim() == 1:
        t = t[None, :]
    if t.dim() != 2 or (not allow_2d and t.shape[0] != 1):
        raise UserError(f"{name} must be one sequence{' or a batch (B, T)' if allow_2d else ''} of token ids, got shape {tuple(t.shape)}.")
    if t.numel() == 0:
        raise UserError(f"{name} is empty; give at least one token id.")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab:
        bad = hi if hi >= vocab else lo
        raise UserError(f"{name} contains token id {bad}, outside the vocabulary [0, {vocab - 1}] (vocab_size={vocab}).")
    return t


class NeuroGenModel:
    """The seed's NeuroGen API (see the module docs)."""

    def __init__(self, vocab_size: int = 50257, embedding_dim: int = 512, gpu_device: int = 0, **config: Any):
        cfg = make_config(vocab_size, embedding_dim, **config)
        self.device = _pick_device(gpu_device)
        self.gpu_device = int(gpu_device)
        self._build(cfg)

    # ------------------------------------------------------------------ set-up

    def _build(self, cfg: BrainConfig) -> None:
        self.cfg = cfg
        self.brain = Brain(cfg).to(self.device)
        self.optimizer = adamw(self.brain.readout_parameters(), lr=cfg.lr,
                               weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.dopamine = Dopamine(RewardBaseline(decay=cfg.dopamine_baseline_decay))
        self.three_factor = ThreeFactor(cfg.three_factor_lr)
        self.tagging = SynapticTagging(cfg.tag_threshold, cfg.capture_rate, cfg.early_decay, cfg.prp_threshold)
        self.scaling = SynapticScaling(cfg.homeostasis_rate, cfg.homeostasis_ema)
        self.replay = HippocampalReplay(ReplayBuffer(cfg.replay_capacity, seed=cfg.seed), cfg.replay_batch,
                                        cfg.replay_interval)
        self._scalable = self.brain.scalable()
        self.sample_generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.tokens_processed = 0
        self.loss_sum = 0.0
        self.last_loss = float("nan")
        self.last_accuracy = float("nan")
        self.activity_stats: dict[str, Any] = {}

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def embedding_dim(self) -> int:
        return self.cfg.embedding_dim

    def set_token_frequencies(self, counts: Any) -> None:
        """Order the adaptive softmax (``softmax='adaptive'``) by token frequency: ``counts``
        holds one count per vocabulary id (e.g. ``np.bincount(train_ids, minlength=vocab)``).
        Call it before training: it decides which tokens the head predicts directly."""
        self.brain.set_token_order(torch.as_tensor(np.asarray(counts)))

    def set_lr(self, lr: float) -> None:
        """Change the readout's learning rate (e.g. to fine-tune a loaded checkpoint)."""
        if not isinstance(lr, int | float) or isinstance(lr, bool) or not lr > 0 or not math.isfinite(lr):
            raise UserError(f"lr must be a positive number, got {lr!r}.")
        self.cfg.lr = float(lr)
        for g in self.optimizer.param_groups:
            g["lr"] = float(lr)

    # ------------------------------------------------------------------ input checks

    def _pair(self, input_ids: Any, target_ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = _as_ids(input_ids, "input_ids", self.vocab_size)
        y = _as_ids(target_ids, "target_ids", self.vocab_size)
        if x.shape != y.shape:
            raise UserError(
                f"input_ids has shape {tuple(x.shape)} but target_ids has {tuple(y.shape)}; give one target per input token."
            )
        return x.to(self.device), y.to(self.device)

    # ------------------------------------------------------------------ training

    def _loss_and_backward(self, act: Activity, x: torch.Tensor, y: torch.Tensor,
                           backward: bool) -> tuple[torch.Tensor, int]:
        """Per-token cross-entropy (B, T) and the number of correct argmax predictions; with
        ``backward`` the mean loss is back-propagated (logits in row chunks: a 50k vocabulary
        never needs all logits of a batch at once)."""
        brain = self.brain
        B, T = x.shape
        rows = B * T
        with torch.set_grad_enabled(backward):
            h = brain.features(act, x)
        hd = h.detach().requires_grad_(backward)
        yf = y.reshape(-1)
        if self.cfg.softmax == "adaptive":
            with torch.set_grad_enabled(backward):
                nll = brain.token_nll(hd, yf)
            with torch.no_grad():
                # accuracy on a strided sample of rows: the adaptive softmax's argmax needs the
                # whole distribution for rows whose head picks a tail cluster
                stride = max(1, rows // _ACCURACY_ROWS)
                hit = (brain.predict(hd.detach()[::stride]) == yf[::stride]).float().mean()
                correct = int(round(float(hit) * rows))
            if backward:
                (nll.sum() / rows).backward()
                h.backward(hd.grad)
            return nll.detach().view(B, T), correct
        ce = torch.empty(rows, device=x.device)
        correct = 0
        chunk = max(1, _LOGIT_CHUNK // self.vocab_size)
        for s in range(0, rows, chunk):
            e = min(rows, s + chunk)
            with torch.set_grad_enabled(backward):
                logits = brain.head(hd[s:e]).float()
                loss = F.cross_entropy(logits, yf[s:e], reduction="none")
            ce[s:e] = loss.detach()
            correct += int((logits.detach().argmax(-1) == yf[s:e]).sum())
            if backward:
                (loss.sum() / rows).backward()
        if backward:
            h.backward(hd.grad)
        return ce.view(B, T), correct

    def _learn(self, x: torch.Tensor, y: torch.Tensor, replay: bool = False) -> tuple[float, float]:
        brain, cfg = self.brain, self.cfg
        B, T = x.shape
        state = brain.fresh_state(B)
        prev_i, prev_v = state.prev_idx.clone(), state.prev_val.clone()
        act = brain.run_cycle(x, state)
        self.optimizer.zero_grad(set_to_none=True)
        ce, correct = self._loss_and_backward(act, x, y, backward=True)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(brain.readout_parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # dopamine and the brain's own rules
        delta = self.dopamine(-ce, update=not replay)
        n = B * T
        dev = "cpu" if brain.use_kernel() else self.device
        # firing counts of every stream (cheap: no dopamine, no synapse visits) for homeostasis
        _, counts = brain.eligibility(act, prev_i, prev_v, torch.zeros(B, T, device=dev))
        counts = counts.to(self.device)
        dw = None
        if cfg.three_factor:
            # coincidences of a strided subset of the streams drive the three-factor update
            # (an estimate of the all-stream mean at a fraction of the cost)
            rows = torch.arange(B)
            if 0 < cfg.plasticity_streams < B:
                rows = rows[:: B // cfg.plasticity_streams][: cfg.plasticity_streams]
            sub = Activity(*(t[rows] for t in act))
            dopa = lookahead(delta[rows], cfg.eligibility_decay).to(dev)
            dw, _ = brain.eligibility(sub, prev_i[rows], prev_v[rows], dopa)
            dw = self.three_factor.scale(dw.to(self.device), len(rows) * T)
        if cfg.tagging:
            self.tagging.step(brain, dw, self.dopamine.last_mean, force=replay, w_max=cfg.w_max)
        elif dw is not None:
            with torch.no_grad():
                brain.w_late.add_(dw).clamp_(0.0, cfg.w_max)
        self.scaling.observe(brain, counts, n)
        if cfg.homeostasis:
            self.scaling.apply(brain, self._scalable)
        self.scaling.update_deviation(brain, [m for m in MODULES if m != "thalamus"])
        if not replay:
            self._activity_stats(act, counts, n)
        return float(ce.mean()), correct / n

    @torch.no_grad()
    def _activity_stats(self, act: Activity, counts: torch.Tensor, n: int) -> None:
        brain = self.brain
        rates = {}
        for m in MODULES:
            sl = brain.neuron_slice(m)
            rates[m] = float(counts[sl].sum()) / (brain.sizes[m] * n)
        # working-memory persistence: PFC winners that were also winners one token earlier
        sl = brain.module_slice("pfc")
        pfc = act.idx[:4, -65:, sl].long()
        if pfc.shape[1] > 1:
            a, b = pfc[:, 1:], pfc[:, :-1]
            same = ((a[..., :, None] == b[..., None, :]) & (a[..., :, None] >= 0)).any(-1)
            persistence = float(same.sum()) / max(int((a >= 0).sum()), 1)
        else:
            persistence = 0.0
        self.activity_stats = {
            "firing_rate": rates,
            "thalamic_gate": float(act.gate.mean()),
            "recall_rate": float((act.recall > 0).float().mean()),
            "recall_strength": float(act.recall[act.recall > 0].mean()) if bool((act.recall > 0).any()) else 0.0,
            "working_memory_persistence": persistence,
        }

    def train_step(self, input_ids: Any, target_ids: Any) -> float:
        """Learn from one sequence (or a batch of equally long ones); returns the mean loss."""
        x, y = self._pair(input_ids, target_ids)
        self.brain.train()
        loss, acc = self._learn(x, y)
        self.step += 1
        self.tokens_processed += x.numel()
        self.loss_sum += loss
        self.last_loss = loss
        self.last_accuracy = acc
        if self.cfg.replay:
            self.replay.add(x, y)
            if self.replay.due(self.step):
                self.consolidate()
        return loss

    def consolidate(self) -> None:
        """Replay stored episodes now (consolidation with forced capture)."""
        if len(self.replay.buffer) == 0:
            return
        rx, ry = self.replay.sample()
        self._learn(rx.to(self.device), ry.to(self.device), replay=True)
        self.replay.events += 1
        self.replay.replayed_tokens += rx.numel()

    @torch.no_grad()
    def evaluate(self, input_ids: Any, target_ids: Any) -> float:
        """Mean cross-entropy (nats/token) of the predictions, without learning."""
        x, y = self._pair(input_ids, target_ids)
        self.brain.eval()
        act = self.brain.run_cycle(x, self.brain.fresh_state(x.shape[0]))
        ce, _ = self._loss_and_backward(act, x, y, backward=False)
        return float(ce.mean())

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompt_token_ids: Any, max_length: int = 100, temperature: float = 1.0, *,
                 seed: int | None = None, eos_token_id: int | None = None) -> list[int]:
        """``max_length`` new tokens after the prompt (fewer if ``eos_token_id`` comes);
        ``temperature=0`` is greedy. Sampling uses the model's generator (or ``seed``)."""
        p = _as_ids(prompt_token_ids, "prompt_token_ids", self.vocab_size, allow_2d=False).to(self.device)
        if isinstance(max_length, bool) or not isinstance(max_length, int | np.integer) or max_length < 0:
            raise UserError(f"max_length must be a non-negative integer, got {max_length!r}.")
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not math.isfinite(temperature) or temperature < 0:
            raise UserError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}.")
        gen = self.sample_generator if seed is None else torch.Generator().manual_seed(int(seed))
        brain = self.brain
        brain.eval()
        state = brain.fresh_state(1)
        syn = brain.synapses()  # the weights do not change while generating
        act = brain.run_cycle(p, state, synapses=syn)
        last = p[:, -1:]
        out: list[int] = []
        while len(out) < int(max_length):
            a = Activity(*(t[:, -1:] for t in act))
            h = brain.features(a, last)
            logits = (brain.head(h).float() if self.cfg.softmax == "full" else brain.log_probs(h))[0].cpu()
            if temperature == 0:
                tok = int(logits.argmax())
            else:
                probs = torch.softmax(logits / float(temperature), dim=-1)
                tok = int(torch.multinomial(probs, 1, generator=gen))
            out.append(tok)
            if eos_token_id is not None and tok == eos_token_id:
                break
            last = torch.tensor([[tok]], device=self.device)
            act = brain.run_cycle(last, state, synapses=syn)
        return out

    # ------------------------------------------------------------------ statistics

    @torch.no_grad()
    def get_statistics(self) -> dict[str, Any]:
        """Counters, per-module activity and weights, dopamine and every mechanism's numbers."""
        brain, cfg = self.brain, self.cfg
        w = brain.weights()
        post_mod = torch.bucketize(brain.syn_post.long(), brain.noff[1:], right=True)
        sums = torch.zeros(len(brain.n_all), device=w.device).index_add_(0, post_mod, w)
        cnts = torch.bincount(post_mod, minlength=len(brain.n_all)).float()
        rates = self.activity_stats.get("firing_rate", {})
        modules = {}
        for i, m in enumerate(MODULES):
            modules[m] = {
                "neurons": brain.sizes[m],
                "active_per_token": brain.k[m],
                "firing_rate": rates.get(m, 0.0),
                "mean_weight": float(sums[i] / cnts[i]) if cnts[i] > 0 else 0.0,
            }
        steps = max(self.step, 1)
        return {
            "step": self.step,
            "tokens_processed": self.tokens_processed,
            "loss": self.last_loss,
            "loss_average": self.loss_sum / steps if self.step else float("nan"),
            "accuracy": self.last_accuracy,
            "dopamine": self.dopamine.last_mean,
            "dopamine_baseline": self.dopamine.baseline.value,
            "reward": self.dopamine.last_reward,
            "neurons": brain.n_neurons,
            "synapses": brain.n_synapses,
            "modules": modules,
            "thalamic_gate": self.activity_stats.get("thalamic_gate", 0.0),
            "recall_rate": self.activity_stats.get("recall_rate", 0.0),
            "recall_strength": self.activity_stats.get("recall_strength", 0.0),
            "working_memory_persistence": self.activity_stats.get("working_memory_persistence", 0.0),
            "three_factor_update_norm": self.three_factor.last_update_norm,
            "tagged_fraction": self.tagging.tagged_fraction,
            "captures": self.tagging.captures,
            "captured_synapses": self.tagging.captured_synapses,
            "early_phase_norm": float(brain.w_early.norm()),
            "homeostasis_deviation": self.scaling.deviation,
            "consolidation_events": self.replay.events,
            "replayed_tokens": self.replay.replayed_tokens,
            "replay_episodes": len(self.replay.buffer),
            "mechanisms": {m: bool(getattr(cfg, m)) for m in MECHANISMS},
            "activity": cfg.activity,
            "scale": cfg.scale,
            "backend": "numba" if brain.use_kernel() else "torch",
            "device": str(self.device),
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    # ------------------------------------------------------------------ checkpoints

    def learning_state(self) -> dict[str, Any]:
        """The optimizer's and every learning rule's state, and the sampler's (tensors included)."""
        return {
            "dopamine": self.dopamine.state_dict(),
            "three_factor": self.three_factor.state_dict(),
            "tagging": self.tagging.state_dict(),
            "scaling": self.scaling.state_dict(),
            "replay": self.replay.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sample_generator": self.sample_generator.get_state(),
        }

    def save_checkpoint(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Weights and all learning state to ``path`` (safetensors, whatever the extension),
        everything else to ``<path>.json``; both written atomically. ``extra``: JSON-able
        data stored under ``"extra"`` (a trainer's position)."""
        path = Path(path)
        if path.is_dir():
            raise UserError(f"{str(path)!r} is a directory; give a file path such as {str(path / 'brain.ckpt')!r}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in model_tensors(self.brain).items()}
        learning = flatten_state(self.learning_state(), tensors, "learning")
        doc = {
            "format": CHECKPOINT_FORMAT,
            "format_version": FORMAT_VERSION,
            "config": self.cfg.to_dict(),
            "structure": self.cfg.structure(),
            **self.counters_state(),
            "learning": learning,
            "extra": extra or {},
        }
        meta = metadata_path(path)
        tmp_w = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp_m = meta.with_name(f".{meta.name}.tmp-{os.getpid()}")
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_w),
                      metadata={"format": CHECKPOINT_FORMAT})
            tmp_m.write_text(json.dumps(flatten_state(doc, {}, "")), encoding="utf-8")
            os.replace(tmp_w, path)
            os.replace(tmp_m, meta)
        finally:
            for t in (tmp_w, tmp_m):
                if t.exists():
                    t.unlink()
        return path

    def counters_state(self) -> dict[str, Any]:
        """The counters and last activity statistics (JSON-able): what
        :meth:`restore` takes besides the tensors and the learning state."""
        return {
            "counters": {"step": self.step, "tokens_processed": self.tokens_processed,
                         "loss_sum": self.loss_sum, "last_loss": self.last_loss,
                         "last_accuracy": self.last_accuracy},
            "activity_stats": self.activity_stats,
        }

    @staticmethod
    def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
        """The checkpoint's JSON (checked to be a NeuroGen checkpoint)."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"Checkpoint {str(path)!r} does not exist.")
        if path.is_dir():
            raise UserError(f"{str(path)!r} is a directory; give the checkpoint file written by save_checkpoint.")
        meta = metadata_path(path)
        if not meta.is_file():
            raise UserError(f"Checkpoint {str(path)!r} has no metadata file {meta.name!r} beside it; "
                            "copy both files written by save_checkpoint.")
        try:
            doc = json.loads(meta.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{str(meta)!r} is not valid JSON (truncated or foreign file).") from exc
        if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{str(meta)!r} is not the metadata of a NeuroGen checkpoint.")
        if int(doc.get("format_version", 0)) > FORMAT_VERSION:
            raise UserError(f"{str(path)!r} was written by a newer neuroplastic (format {doc['format_version']}); upgrade to load it.")
        return doc

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, gpu_device: int = -1) -> NeuroGenModel:
        """A model with the size and settings stored in the checkpoint, loaded from it."""
        doc = cls.read_metadata(path)
        cfg = dict(doc["config"])
        model = cls(cfg.pop("vocab_size"), cfg.pop("embedding_dim"), gpu_device, **cfg)
        model.load_checkpoint(path)
        return model

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore everything ``save_checkpoint`` wrote; returns the stored ``extra`` data.

        The checkpoint's size (vocabulary, embedding, neurons, code, hippocampal capacity)
        must match this model's; its other settings (mechanisms, learning rates) are adopted.
        """
        doc = self.read_metadata(path)
        try:
            saved = build_dataclass(BrainConfig, dict(doc["config"])).validate()
        except (KeyError, TypeError) as exc:
            raise UserError(f"{str(metadata_path(path))!r} has no valid brain configuration.") from exc
        if saved.structure() != self.cfg.structure():
            a, b = saved.structure(), self.cfg.structure()
            diff = next(k for k in a if a[k] != b[k])
            raise UserError(
                f"Checkpoint {str(path)!r} is a brain with {diff}={a[diff]} but this model has {diff}={b[diff]}; "
                f"create NeuroGenModel with the checkpoint's size (or use NeuroGenModel.from_checkpoint)."
            )
        tensors = load_safetensors(Path(path))
        learning_skeleton = doc.pop("learning", None)
        doc = unflatten_state(doc, {})
        if saved != self.cfg:
            self._build(saved)
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            learning = unflatten_state(learning_skeleton, tensors)
        except (KeyError, TypeError) as exc:
            raise UserError(f"Checkpoint {str(path)!r} is inconsistent (tensor {exc} is missing).") from exc
        self.restore(model_state, learning, doc, path)
        return doc.get("extra") or {}

    def restore(self, model_state: dict[str, torch.Tensor], learning: Any, counters: dict[str, Any],
                source: str | os.PathLike) -> None:
        """Put a saved brain back: its tensors (``brain.state_dict()``), :meth:`learning_state`
        and :meth:`counters_state`; ``source`` (the checkpoint) is named in errors. The model
        must already have the checkpoint's configuration."""
        expected = self.brain.state_dict()
        missing = [k for k in expected if k not in model_state]
        if missing or any(tuple(model_state[k].shape) != tuple(expected[k].shape) for k in expected):
            raise UserError(f"Checkpoint {str(source)!r} does not fit this brain (missing or misshapen {missing[:2] or 'tensors'}); it is damaged or from another version.")
        try:
            learning["optimizer"]
        except (KeyError, TypeError) as exc:
            raise UserError(f"Checkpoint {str(source)!r} is inconsistent (tensor {exc} is missing).") from exc
        self.brain.load_state_dict(model_state)
        self.optimizer.load_state_dict(learning["optimizer"])
        self.dopamine.load_state_dict(learning["dopamine"])
        self.three_factor.load_state_dict(learning["three_factor"])
        self.tagging.load_state_dict(learning["tagging"])
        self.scaling.load_state_dict(learning["scaling"])
        self.replay.load_state_dict(learning["replay"])
        self.sample_generator.set_state(learning["sample_generator"].to(torch.uint8).clone())
        c = counters["counters"]
        self.step = int(c["step"])
        self.tokens_processed = int(c["tokens_processed"])
        self.loss_sum = float(c["loss_sum"])
        self.last_loss = float(c["last_loss"])
        self.last_accuracy = float(c["last_accuracy"])
        self.activity_stats = counters.get("activity_stats") or {}

    def __repr__(self) -> str:
        return (f"NeuroGenModel(vocab_size={self.vocab_size}, embedding_dim={self.embedding_dim}, "
                f"neurons={self.brain.n_neurons:,}, synapses={self.brain.n_synapses:,}, device={self.device})")
