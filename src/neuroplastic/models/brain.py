"""NeuroGen's modular brain: six neuron populations, sparse fixed fan-in wiring, a five-phase
cycle per token, and a readout trained by gradient.

Modules (the seed's sizes at ``scale=1``, 79,872 neurons):

=============== ======= ==========================================================
thalamus          2,048 relay: each token has a fixed code of ``thalamic_code`` neurons,
                        gated top-down by the PFC (attention)
wernicke         16,384 perception: k-WTA of the thalamic input
pfc              32,768 integration and working memory (leaky potentials, recurrence)
hippocampus       8,192 episodic memory: stores (its pattern -> next token) and recalls
basal_ganglia     4,096 selection: disinhibits (gates) Broca
broca            16,384 action: k-WTA of cortical input, gated by the basal ganglia; its
                        active neurons are what the readout turns into next-token logits
=============== ======= ==========================================================

Per token, for every stream (many sequences advance in parallel), the cycle is:

1. *sensation*: the token's thalamic code; each code neuron's value is the gate
   ``sigmoid(gate_gain * topdown + gate_bias)`` where ``topdown`` is the input from the
   PFC's previous activity (``thalamic_gating=False``: all gates 1);
2. *perception*: Wernicke = k-WTA(thalamus -> Wernicke);
3. *integration*: hippocampus = k-WTA(Wernicke, PFC of the previous token); it recalls the
   stored episode whose pattern overlaps most with the current one (at least
   ``recall_threshold`` of its neurons) and replays the thalamic code of the token that
   followed it as a *recall* pattern (value = overlap fraction); then it stores the episode
   (previous pattern -> this token) in a ring of ``hippocampal_capacity`` episodes per
   stream. PFC = k-WTA(Wernicke, PFC recurrence, recall) over potentials that leak by
   ``working_memory_decay`` per token (the previous winners stay candidates);
4. *selection*: basal ganglia = k-WTA(PFC, Wernicke);
5. *action*: Broca's drive from Wernicke, PFC and recall is multiplied by the basal-ganglia
   gate ``bg_floor + (1 - bg_floor) * (1 - exp(-g))`` (``g``: input from the basal
   ganglia) before its k-WTA.

Activity: ``activity="kwta"`` (default) keeps the ``k = round(sparsity * N)`` neurons with the
largest positive drive and gives them the rate ``x / (1 + x)`` of ``x = rate_gain * drive``.
``activity="lif"`` makes every module a population of leaky integrate-and-fire neurons:
potentials leak by ``lif_decay`` per token, neurons above ``lif_threshold`` spike (value 1)
and reset, at most ``k`` per token (the strongest). Both are event-driven: only neurons that
received input this token are candidates (plus, for working memory, the previous winners),
and potentials decay lazily (``v * decay ** (tokens since last update)``).

Connectivity: every projection has a fan-out ``F`` per source neuron and the same fan-in
``N_src * F / N_tgt`` for every target neuron (exactly, whenever that is an integer: always
at power-of-two scales), stored as index + weight tensors (never a dense matrix). All
outgoing synapses of a source neuron lie next to each other (one cache miss per active
neuron). Synapses are excitatory, ``0 <= w <= w_max``, and learn by the brain's local rules
(:mod:`neuroplastic.models.brain_rules`); the effective weight is late-phase + early-phase
(tagging and capture).

Readout (the only part trained by gradient, with the token embeddings)::

    h = layer_norm(sum_{j in Broca winners} rate_j * motor[j])  +  gate_t * embed[x_t]
    logits = head(h)

``gate_t`` is the mean thalamic gate of the token: the thalamus relays (gates) the token
embedding to the readout (``embedding_relay=False`` removes that path, so everything goes
through Broca).

Two implementations of the cycle compute the same thing: a compiled, event-driven CPU
kernel (:mod:`neuroplastic.models.brain_kernels`, numba) and a batched torch reference
(:meth:`Brain._cycle_torch`, any device). ``backend="auto"`` takes the kernel on CPU when
numba is installed.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from neuroplastic.errors import UserError
from neuroplastic.models import brain_kernels as K

__all__ = [
    "MODULES",
    "PROJECTIONS",
    "SEED_SIZES",
    "Activity",
    "Brain",
    "BrainConfig",
    "BrainState",
]

#: module names in the kernel's numbering (THAL .. BROCA); "recall" is the hippocampal
#: recall pattern, which lives in the thalamic code space
MODULES = ("thalamus", "wernicke", "pfc", "hippocampus", "basal_ganglia", "broca")
_ALL = (*MODULES, "recall")
SEED_SIZES = {
    "thalamus": 2048,
    "wernicke": 16384,
    "pfc": 32768,
    "hippocampus": 8192,
    "basal_ganglia": 4096,
    "broca": 16384,
}

#: (source, target, fan-out per source neuron, delay in tokens, kind); kind "gate" feeds the
#: basal-ganglia gate of Broca instead of its drive
PROJECTIONS = (
    ("pfc", "thalamus", 1, 1, "drive"),  # top-down attention on the thalamic relay
    ("thalamus", "wernicke", 32, 0, "drive"),
    ("wernicke", "hippocampus", 4, 0, "drive"),
    ("pfc", "hippocampus", 2, 1, "drive"),
    ("wernicke", "pfc", 8, 0, "drive"),
    ("pfc", "pfc", 4, 1, "drive"),  # working-memory recurrence
    ("recall", "pfc", 32, 0, "drive"),
    ("pfc", "basal_ganglia", 1, 0, "drive"),
    ("wernicke", "basal_ganglia", 2, 0, "drive"),
    ("wernicke", "broca", 8, 0, "drive"),
    ("pfc", "broca", 4, 0, "drive"),
    ("recall", "broca", 32, 0, "drive"),
    ("basal_ganglia", "broca", 16, 0, "gate"),
)

#: potentials are kept this many tokens at most (decay ** 64 is below 1e-6 at decay 0.8)
DECAY_STEPS = 64

#: config switches of the mechanisms (each can be turned off; ``get_statistics`` shows them)
MECHANISMS = (
    "thalamic_gating",
    "working_memory",
    "hippocampus",
    "basal_ganglia",
    "embedding_relay",
    "three_factor",
    "tagging",
    "homeostasis",
    "replay",
)


@dataclass
class BrainConfig:
    """Everything that defines a brain and how it learns (see the module docs)."""

    vocab_size: int = 50257
    embedding_dim: int = 512
    scale: float = 1.0  # neurons per module = seed size * scale
    sparsity: float = 1 / 256  # fraction of a module active per token (k-WTA)
    thalamic_code: int = 0  # thalamic neurons per token (0: N_thalamus / 128, at least 4)
    activity: str = "kwta"  # kwta (rates) | lif (spikes)
    working_memory_decay: float = 0.7  # PFC potential kept per token (kwta)
    lif_decay: float = 0.8  # membrane potential kept per token (lif)
    lif_threshold: float = 1.0
    rate_gain: float = 1.0
    gate_gain: float = 1.0
    gate_bias: float = 0.0
    recall_threshold: float = 0.25
    hippocampal_capacity: int = 64  # episodes per stream
    bg_floor: float = 0.25  # Broca drive passed without basal-ganglia disinhibition
    weight_init: float = 1.0  # mean initial synaptic weight
    w_max: float = 4.0
    # mechanisms
    thalamic_gating: bool = True
    working_memory: bool = True
    hippocampus: bool = True
    basal_ganglia: bool = True
    embedding_relay: bool = True
    three_factor: bool = True
    tagging: bool = True
    homeostasis: bool = True
    replay: bool = True
    # readout: "full" softmax over the vocabulary, or "adaptive" (Grave et al., 2017): a head
    # over the adaptive_cutoffs[0] most frequent tokens plus one entry per tail cluster, each
    # tail a low-rank (embedding_dim / adaptive_div**i) softmax over rarer tokens. Frequency
    # order: token ids as given (BPE ids follow merge order, roughly frequency) unless
    # NeuroGenModel.set_token_frequencies() was called before training.
    softmax: str = "full"
    adaptive_cutoffs: list[int] = dataclasses.field(default_factory=lambda: [512, 4000, 16000])
    adaptive_div: float = 4.0
    # learning: readout and embeddings (gradient)
    lr: float = 1e-2
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # three-factor rule: dw = three_factor_lr * mean_{b,t} D[b,t] * pre * post
    three_factor_lr: float = 1.0
    eligibility_decay: float = 0.5  # D[t] = sum_{t' >= t} decay^(t'-t) * dopamine[t']
    plasticity_streams: int = 16  # streams per step whose coincidences are counted (0: all)
    dopamine_baseline_decay: float = 0.99
    # synaptic tagging and capture
    tag_threshold: float = 0.02  # |early-phase weight| above which a synapse is tagged
    capture_rate: float = 0.5
    early_decay: float = 0.9  # early-phase weight kept per step (untagged changes fade)
    prp_threshold: float = 0.0  # capture when the step's mean dopamine exceeds this
    # homeostatic synaptic scaling
    homeostasis_rate: float = 0.1
    homeostasis_ema: float = 0.9
    # consolidation by hippocampal replay
    replay_interval: int = 50  # steps between replays
    replay_capacity: int = 256  # episodes kept (reservoir sample of all seen)
    replay_batch: int = 8  # episodes per replay
    seed: int = 0
    backend: str = "auto"  # auto | numba | torch

    # ------------------------------------------------------------------ derived sizes

    def sizes(self) -> dict[str, int]:
        return {m: max(4, int(round(n * self.scale))) for m, n in SEED_SIZES.items()}

    def winners(self) -> dict[str, int]:
        sizes = self.sizes()
        k = {m: max(2, int(round(n * self.sparsity))) for m, n in sizes.items() if m != "thalamus"}
        k = {m: min(v, sizes[m]) for m, v in k.items()}
        code = self.thalamic_code or max(4, sizes["thalamus"] // 128)
        k["thalamus"] = min(code, sizes["thalamus"])
        k["recall"] = k["thalamus"]
        return {m: k[m] for m in _ALL}

    def structure(self) -> dict[str, Any]:
        """The fields that fix tensor shapes and wiring (must match to load a checkpoint)."""
        return {
            "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim,
            "sizes": self.sizes(),
            "thalamic_code": self.winners()["thalamus"],
            "hippocampal_capacity": self.hippocampal_capacity,
            "readout": (["full"] if self.softmax == "full" else
                        ["adaptive", *self.cutoffs(), self.adaptive_div]),
        }

    def cutoffs(self) -> list[int]:
        """The adaptive softmax's cutoffs below the vocabulary size."""
        return [int(c) for c in self.adaptive_cutoffs if int(c) < self.vocab_size]

    def validate(self) -> BrainConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UserError(msg)

        need(isinstance(self.vocab_size, int) and self.vocab_size >= 2,
             f"vocab_size must be an integer >= 2, got {self.vocab_size!r}.")
        need(isinstance(self.embedding_dim, int) and self.embedding_dim >= 1,
             f"embedding_dim must be a positive integer, got {self.embedding_dim!r}.")
        need(0 < self.scale <= 64, f"scale must be in (0, 64], got {self.scale}.")
        need(0 < self.sparsity <= 0.5, f"sparsity must be in (0, 0.5], got {self.sparsity}.")
        need(self.thalamic_code >= 0, f"thalamic_code must be >= 0, got {self.thalamic_code}.")
        need(self.activity in ("kwta", "lif"),
             f"activity must be 'kwta' or 'lif', got {self.activity!r}.")
        for key in ("working_memory_decay", "lif_decay", "eligibility_decay", "early_decay",
                    "dopamine_baseline_decay", "homeostasis_ema"):
            v = getattr(self, key)
            need(0 <= v < 1, f"{key} must be in [0, 1), got {v}.")
        for key in ("recall_threshold", "bg_floor", "capture_rate"):
            v = getattr(self, key)
            need(0 <= v <= 1, f"{key} must be in [0, 1], got {v}.")
        for key in ("lr", "w_max", "weight_init", "rate_gain"):
            v = getattr(self, key)
            need(v > 0, f"{key} must be > 0, got {v}.")
        for key in ("weight_decay", "grad_clip", "three_factor_lr", "tag_threshold",
                    "homeostasis_rate", "lif_threshold", "gate_gain"):
            v = getattr(self, key)
            need(v >= 0, f"{key} must be >= 0, got {v}.")
        need(isinstance(self.plasticity_streams, int) and self.plasticity_streams >= 0,
             f"plasticity_streams must be an integer >= 0 (0: all streams), got {self.plasticity_streams!r}.")
        for key in ("hippocampal_capacity", "replay_interval", "replay_capacity", "replay_batch"):
            v = getattr(self, key)
            need(isinstance(v, int) and v >= 1, f"{key} must be a positive integer, got {v!r}.")
        need(self.softmax in ("full", "adaptive"),
             f"softmax must be 'full' or 'adaptive', got {self.softmax!r}.")
        if self.softmax == "adaptive":
            cut = list(self.adaptive_cutoffs)
            need(all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in cut)
                 and cut == sorted(set(cut)),
                 f"adaptive_cutoffs must be increasing positive integers, got {cut!r}.")
            need(len(self.cutoffs()) >= 1,
                 f"adaptive_cutoffs {cut!r} leave no tail below vocab_size {self.vocab_size}; "
                 "use softmax='full' for a vocabulary this small.")
            need(self.adaptive_div >= 1, f"adaptive_div must be >= 1, got {self.adaptive_div}.")
        need(self.backend in ("auto", "numba", "torch"),
             f"backend must be auto, numba or torch, got {self.backend!r}.")
        need(self.weight_init * 1.5 <= self.w_max,
             f"w_max ({self.w_max}) must be at least 1.5 x weight_init ({self.weight_init}).")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Activity(NamedTuple):
    """What one call of the cycle produced, per stream and token.

    ``idx`` / ``val`` (B, T, Ktot): every module's active neurons (``-1``: empty slot) and
    their values, module ``m`` in slots ``koff[m] .. koff[m+1]`` (order of :data:`_ALL`);
    ``gate`` (B, T): mean thalamic gate; ``recall`` (B, T): recall strength (0: none);
    ``recall_token`` (B, T): the recalled token (-1: none).
    """

    idx: torch.Tensor
    val: torch.Tensor
    gate: torch.Tensor
    recall: torch.Tensor
    recall_token: torch.Tensor


@dataclass
class BrainState:
    """Per-stream dynamic state carried from one call of the cycle to the next."""

    tick: int
    v: torch.Tensor  # (B, SV) membrane / working-memory potentials
    tl: torch.Tensor  # (B, SV) token of the last update (-1: never)
    prev_idx: torch.Tensor  # (B, Ktot) the last token's activity
    prev_val: torch.Tensor
    hip_keys: torch.Tensor  # (B, H, k_hip) stored hippocampal patterns
    hip_vals: torch.Tensor  # (B, H) the token that followed each
    hip_n: torch.Tensor  # (B,) episodes stored so far

    @property
    def batch_size(self) -> int:
        return int(self.prev_idx.shape[0])


def _exact_fanin_targets(n_src: int, fan: int, n_tgt: int, gen: torch.Generator) -> torch.Tensor:
    """(n_src, fan) target indices where each target appears n_src*fan/n_tgt times (+-1)."""
    slots = torch.arange(n_src * fan, dtype=torch.int64) % n_tgt
    perm = torch.randperm(n_src * fan, generator=gen)
    return slots[perm].view(n_src, fan).to(torch.int32)


def _thalamic_codes(vocab: int, n_thal: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(vocab, k) distinct thalamic neurons per token (a fixed random code)."""
    out = torch.empty(vocab, k, dtype=torch.int32)
    chunk = max(1, (1 << 22) // n_thal)
    for s in range(0, vocab, chunk):
        e = min(vocab, s + chunk)
        out[s:e] = torch.rand(e - s, n_thal, generator=gen).topk(k, dim=1).indices.to(torch.int32)
    return out


class MotorBag(torch.autograd.Function):
    """``F.embedding_bag(idx, motor, per_sample_weights=val, mode="sum")`` whose ``motor``
    gradient is one sparse matmul ``A^T @ grad`` (``A``: the rows x neurons matrix of the
    rates, built in CSR from a stable sort of ``idx``) instead of embedding_bag's dense
    backward. Same gradient up to float rounding; on a 2-core CPU at 16,384 rows x 64
    winners x d 512 the backward takes ~230 ms instead of ~440 ms. ``idx`` and ``val``
    carry no gradient (the rates come from the no-grad cycle)."""

    @staticmethod
    def forward(ctx, idx: torch.Tensor, val: torch.Tensor, motor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx, val)
        ctx.n = motor.shape[0]
        return F.embedding_bag(idx, motor, per_sample_weights=val, mode="sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        idx, val = ctx.saved_tensors
        rows, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # fixed summation order: deterministic
        crow = torch.zeros(ctx.n + 1, dtype=torch.int64, device=idx.device)
        torch.cumsum(torch.bincount(flat, minlength=ctx.n), 0, out=crow[1:])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            a_t = torch.sparse_csr_tensor(crow, order // k, val.reshape(-1)[order].to(grad.dtype),
                                          size=(ctx.n, rows), check_invariants=False)
            return None, None, a_t @ grad.contiguous()


def motor_bag(idx: torch.Tensor, val: torch.Tensor, motor: torch.Tensor) -> torch.Tensor:
    """The weighted sum of ``motor`` rows ``idx`` (B*T, k) with weights ``val``: through
    :class:`MotorBag` when only ``motor`` needs a gradient on the CPU, else embedding_bag."""
    if (motor.requires_grad and torch.is_grad_enabled() and not val.requires_grad
            and motor.device.type == "cpu" and motor.dtype == torch.float32):
        return MotorBag.apply(idx, val, motor)
    return F.embedding_bag(idx, motor, per_sample_weights=val, mode="sum")


class Brain(nn.Module):
    """The brain (see the module docs): wiring and plastic synapses as buffers, the readout
    (``embed``, ``motor``, ``norm``, ``head``) as parameters."""

    def __init__(self, cfg: BrainConfig):
        super().__init__()
        self.cfg = cfg.validate()
        sizes = cfg.sizes()
        k = cfg.winners()
        self.sizes = sizes
        self.k = k
        n_all = [sizes[m] if m != "recall" else sizes["thalamus"] for m in _ALL]
        k_all = [k[m] for m in _ALL]
        self.n_neurons = sum(sizes.values())
        gen = torch.Generator().manual_seed(int(cfg.seed))

        # ---- wiring: per source module one block per neuron with all its outgoing synapses
        index = {m: i for i, m in enumerate(_ALL)}
        proj_rows: list[list[int]] = [[] for _ in PROJECTIONS]
        tgt_blocks, off = [], 0
        for s_name in _ALL:
            outgoing = [i for i, p in enumerate(PROJECTIONS) if p[0] == s_name]
            if not outgoing:
                continue
            n_src = n_all[index[s_name]]
            stride = sum(PROJECTIONS[i][2] for i in outgoing)
            block = torch.empty(n_src, stride, dtype=torch.int32)
            col = 0
            for i in outgoing:
                src, tgt, fan, delay, kind = PROJECTIONS[i]
                n_tgt = n_all[index[tgt]]
                block[:, col : col + fan] = _exact_fanin_targets(n_src, fan, n_tgt, gen)
                proj_rows[i] = [index[src], index[tgt], off + col, fan, delay,
                                1 if kind == "gate" else 0, stride]
                col += fan
            tgt_blocks.append(block.reshape(-1))
            off += n_src * stride
        syn_tgt = torch.cat(tgt_blocks)
        n_syn = syn_tgt.numel()
        proj = torch.tensor(proj_rows, dtype=torch.int64)
        w_late = (cfg.weight_init * (0.5 + torch.rand(n_syn, generator=gen))).float()
        noff = torch.tensor([0, *np.cumsum(n_all).tolist()], dtype=torch.int64)
        koff = torch.tensor([0, *np.cumsum(k_all).tolist()], dtype=torch.int64)
        # flat post-synaptic neuron of every synapse (for homeostatic scaling)
        syn_post = torch.empty(n_syn, dtype=torch.int64)
        for p in range(proj.shape[0]):
            src, tgt, o, fan, _, _, stride = proj[p].tolist()
            ids = (o + torch.arange(n_all[src])[:, None] * stride + torch.arange(fan)[None, :]).reshape(-1)
            syn_post[ids] = syn_tgt[ids].long() + noff[tgt]
        self.register_buffer("syn_tgt", syn_tgt)
        self.register_buffer("w_late", w_late)
        self.register_buffer("w_early", torch.zeros(n_syn))
        self.register_buffer("tags", torch.zeros(n_syn))
        self.register_buffer("syn_post", syn_post.to(torch.int32))
        self.register_buffer("proj", proj)
        order = torch.argsort(proj[:, 1], stable=True)
        self.register_buffer("tgt_order", order)
        self.register_buffer(
            "tgt_start", torch.searchsorted(proj[order, 1].contiguous(), torch.arange(len(_ALL) + 1))
        )
        self.register_buffer("noff", noff)
        self.register_buffer("koff", koff)
        self.register_buffer("kmod", torch.tensor(k_all, dtype=torch.int64))
        self.register_buffer("code", _thalamic_codes(cfg.vocab_size, sizes["thalamus"], k["thalamus"], gen))
        self.register_buffer("rate_ema", torch.tensor(
            [k_all[i] / n_all[i] for i, m in enumerate(_ALL) for _ in range(n_all[i])], dtype=torch.float32))
        self.n_synapses = n_syn
        self.n_all = n_all

        # ---- readout (gradient)
        d = cfg.embedding_dim
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.motor = nn.Parameter(torch.empty(sizes["broca"], d))
        self.norm = nn.LayerNorm(d)
        if cfg.softmax == "full":
            self.head = nn.Linear(d, cfg.vocab_size)
        else:
            self.head = nn.AdaptiveLogSoftmaxWithLoss(d, cfg.vocab_size, cfg.cutoffs(),
                                                      div_value=float(cfg.adaptive_div), head_bias=True)
            # token id -> position in frequency order, and back (identity until set_token_order)
            self.register_buffer("rank", torch.arange(cfg.vocab_size))
            self.register_buffer("unrank", torch.arange(cfg.vocab_size))
        with torch.no_grad():
            self.embed.weight.normal_(0.0, 1.0, generator=gen)  # on the scale of the normalised Broca code
            # k Broca rates add up: keep their sum on the scale of one embedding row
            self.motor.normal_(0.0, 0.02 / math.sqrt(k["broca"]), generator=gen)
            for name, w in self.head.named_parameters():
                if name.endswith("bias"):
                    w.zero_()
                else:
                    w.normal_(0.0, 0.02, generator=gen)

    # ------------------------------------------------------------------ helpers

    @property
    def device(self) -> torch.device:
        return self.w_late.device

    def module_slice(self, name: str) -> slice:
        i = _ALL.index(name)
        return slice(int(self.koff[i]), int(self.koff[i + 1]))

    def neuron_slice(self, name: str) -> slice:
        i = _ALL.index(name)
        return slice(int(self.noff[i]), int(self.noff[i + 1]))

    def weights(self) -> torch.Tensor:
        """Effective synaptic weights: late + early phase, clamped to [0, w_max]."""
        if self.cfg.tagging:
            return (self.w_late + self.w_early).clamp_(0.0, self.cfg.w_max)
        return self.w_late

    def use_kernel(self) -> bool:
        b = self.cfg.backend
        if self.device.type != "cpu":
            if b == "numba":
                raise UserError("backend 'numba' runs on the CPU only; use backend 'torch' or 'auto' on a GPU.")
            return False
        if b == "numba" and not K.AVAILABLE:
            raise UserError("backend 'numba' needs numba; install it with `pip install numba` (or use backend 'auto').")
        return K.AVAILABLE and b in ("auto", "numba")

    def _flags(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Kernel arguments: flags, float params, decay table, thresholds, state offsets."""
        c = self.cfg
        lif = c.activity == "lif"
        flags = np.array([c.thalamic_gating, c.hippocampus, c.working_memory, c.basal_ganglia, lif],
                         dtype=np.int64)
        fparams = np.array([c.gate_gain, c.gate_bias, c.recall_threshold, c.bg_floor, c.rate_gain],
                           dtype=np.float32)
        leak = np.zeros(len(_ALL), np.float32)
        thr = np.zeros(len(_ALL), np.float32)
        soff = np.full(len(_ALL), -1, np.int64)
        if lif:
            o = 0
            for i, m in enumerate(_ALL):
                if m in ("thalamus", "recall"):
                    continue
                soff[i] = o
                o += self.n_all[i]
                leak[i] = c.lif_decay
                thr[i] = c.lif_threshold
        else:
            soff[_ALL.index("pfc")] = 0
            leak[_ALL.index("pfc")] = c.working_memory_decay
        # decay[m, d] = leak_m ** d: what is left of a potential d tokens later (0 from DECAY_STEPS on)
        d = np.arange(DECAY_STEPS, dtype=np.float64)
        decay = np.where(leak[:, None] > 0, np.float64(leak)[:, None] ** d[None, :], 0.0)
        return flags, fparams, decay, thr, soff

    def state_size(self) -> int:
        if self.cfg.activity == "lif":
            return sum(n for m, n in zip(_ALL, self.n_all) if m not in ("thalamus", "recall"))
        return self.sizes["pfc"]

    def fresh_state(self, batch_size: int) -> BrainState:
        dev = self.device
        ktot = int(self.koff[-1])
        sv = self.state_size()
        return BrainState(
            tick=0,
            v=torch.zeros(batch_size, sv, device=dev),
            tl=torch.full((batch_size, sv), -1, dtype=torch.int64, device=dev),
            prev_idx=torch.full((batch_size, ktot), -1, dtype=torch.int32, device=dev),
            prev_val=torch.zeros(batch_size, ktot, device=dev),
            hip_keys=torch.full((batch_size, self.cfg.hippocampal_capacity, self.k["hippocampus"]), -1,
                                dtype=torch.int32, device=dev),
            hip_vals=torch.zeros(batch_size, self.cfg.hippocampal_capacity, dtype=torch.int32, device=dev),
            hip_n=torch.zeros(batch_size, dtype=torch.int64, device=dev),
        )

    # ------------------------------------------------------------------ the cycle

    @torch.no_grad()
    def synapses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(effective weights (S,), targets and weights side by side (S, 2)) for :meth:`run_cycle`;
        compute once and pass them when calling it token by token with unchanged weights."""
        w = self.weights().contiguous()
        return w, torch.stack([self.syn_tgt.float(), w], 1)

    def run_cycle(self, tokens: torch.Tensor, state: BrainState, backend: str | None = None,
                  synapses: tuple[torch.Tensor, torch.Tensor] | None = None) -> Activity:
        """Run the five-phase cycle over ``tokens`` (B, T), advancing ``state`` in place."""
        B, T = tokens.shape
        use_kernel = self.use_kernel() if backend is None else backend == "numba"
        ktot = int(self.koff[-1])
        dev = self.device
        out = Activity(
            idx=torch.empty(B, T, ktot, dtype=torch.int32, device=dev),
            val=torch.empty(B, T, ktot, dtype=torch.float32, device=dev),
            gate=torch.empty(B, T, dtype=torch.float32, device=dev),
            recall=torch.empty(B, T, dtype=torch.float32, device=dev),
            recall_token=torch.empty(B, T, dtype=torch.int32, device=dev),
        )
        w, syn = synapses if synapses is not None else self.synapses()
        if use_kernel:
            flags, fparams, decay, thr, soff = self._flags()
            n = lambda t: t.numpy()  # noqa: E731 - zero-copy views for the kernel
            K.cycle(
                n(tokens.to(torch.int64).contiguous()), int(state.tick), n(self.code), n(syn),
                n(self.proj), n(self.tgt_order), n(self.tgt_start), n(self.koff),
                n(self.kmod), self.sizes["hippocampus"], soff, decay, thr, flags, fparams, n(state.v), n(state.tl),
                n(state.prev_idx), n(state.prev_val), n(state.hip_keys), n(state.hip_vals),
                n(state.hip_n), n(out.idx), n(out.val), n(out.gate), n(out.recall), n(out.recall_token),
            )
        else:
            self._cycle_torch(tokens.to(dev, torch.int64), state, w, out)
        state.tick += T
        return out

    def _contributions(self, p: int, src_idx: torch.Tensor, src_val: torch.Tensor, w: torch.Tensor,
                       dump: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(targets, weights * pre, touched) of projection p for source rows (B, k_src); empty
        sources point at the extra slot ``dump`` and do not count as touching."""
        _, _, off, fan, _, _, stride = (int(v) for v in self.proj[p])
        valid = (src_idx >= 0) & (src_val != 0)
        j = src_idx.clamp_min(0).long()
        ids = off + j[..., None] * stride + torch.arange(fan, device=j.device)  # (B, k, F)
        tgt = self.syn_tgt[ids].long()
        contrib = w[ids] * src_val[..., None]
        vmask = valid[..., None].expand_as(tgt)
        tgt = torch.where(vmask, tgt, torch.full_like(tgt, dump))
        B = src_idx.shape[0]
        return tgt.reshape(B, -1), contrib.reshape(B, -1), vmask.reshape(B, -1)

    def _cycle_torch(self, tokens: torch.Tensor, st: BrainState, w: torch.Tensor, out: Activity) -> None:
        """Reference implementation of the cycle (batched torch ops; any device)."""
        c = self.cfg
        flags, fparams, decay_table, thr, soff = self._flags()
        decay_table = torch.from_numpy(decay_table).to(tokens.device)
        lif = c.activity == "lif"
        B, T = tokens.shape
        dev = tokens.device
        koff = self.koff.tolist()
        kmod = self.kmod.tolist()
        kth, khip = kmod[0], kmod[3]
        H = st.hip_keys.shape[1]
        ar = torch.arange(B, device=dev)
        order = [(m, self.tgt_order[self.tgt_start[m] : self.tgt_start[m + 1]].tolist()) for m in range(len(_ALL))]
        for t in range(T):
            tick = st.tick + t
            x = tokens[:, t]
            pv_idx = st.prev_idx if t == 0 else out.idx[:, t - 1]
            pv_val = st.prev_val if t == 0 else out.val[:, t - 1]
            row_idx = torch.full((B, koff[-1]), -1, dtype=torch.int32, device=dev)
            row_val = torch.zeros(B, koff[-1], device=dev)
            # 1. sensation
            code = self.code[x].long()  # (B, kth)
            if c.thalamic_gating:
                n_thal = self.n_all[0]
                acc = torch.zeros(B, n_thal + 1, device=dev)
                for p in order[0][1]:
                    sl = slice(koff[int(self.proj[p, 0])], koff[int(self.proj[p, 0]) + 1])
                    src_i, src_v = (pv_idx[:, sl], pv_val[:, sl]) if int(self.proj[p, 4]) == 1 else (row_idx[:, sl], row_val[:, sl])
                    tg, cb, _ = self._contributions(p, src_i, src_v, w, n_thal)
                    acc.scatter_add_(1, tg, cb)
                td = acc.gather(1, code).double()
                g = torch.sigmoid(float(fparams[0]) * td + float(fparams[1])).float()
            else:
                g = torch.ones(B, kth, device=dev)
            row_idx[:, koff[0] : koff[1]] = code.to(torch.int32)
            row_val[:, koff[0] : koff[1]] = g
            out.gate[:, t] = g.double().sum(1).div(kth).float()
            out.recall_token[:, t] = -1
            out.recall[:, t] = 0.0
            for m in (1, 3, 2, 4, 5):
                if m == 3 and not c.hippocampus:
                    continue
                if m == 4 and not c.basal_ganglia:
                    continue
                n_m = self.n_all[m]
                gated = m == 5 and c.basal_ganglia
                tgs, cbs, tch = [], [], []
                gacc = torch.zeros(B, n_m + 1, device=dev) if gated else None
                for p in order[m][1]:
                    src = int(self.proj[p, 0])
                    delay = int(self.proj[p, 4])
                    if src == 2 and m == 2 and delay == 1 and not c.working_memory:
                        continue
                    sl = slice(koff[src], koff[src + 1])
                    src_i, src_v = (pv_idx[:, sl], pv_val[:, sl]) if delay == 1 else (row_idx[:, sl], row_val[:, sl])
                    tg, cb, vm = self._contributions(p, src_i, src_v, w, n_m)
                    if int(self.proj[p, 5]) == 1:
                        if gated:
                            gacc.scatter_add_(1, tg, cb)
                        continue
                    tgs.append(tg)
                    cbs.append(cb)
                    tch.append(vm)
                acc = torch.zeros(B, n_m + 1, device=dev)
                touched = torch.zeros(B, n_m + 1, dtype=torch.bool, device=dev)
                if tgs:
                    tg = torch.cat(tgs, 1)
                    acc.scatter_add_(1, tg, torch.cat(cbs, 1))
                    touched.scatter_(1, tg, torch.cat(tch, 1))
                    touched[:, n_m] = False
                so = int(soff[m])
                stateful = so >= 0 and not (m == 2 and not lif and not c.working_memory)
                if stateful and not lif:  # working memory: previous winners stay candidates
                    prev = pv_idx[:, koff[m] : koff[m + 1]].long()
                    touched.scatter_(1, torch.where(prev >= 0, prev, torch.full_like(prev, n_m)), True)
                    touched[:, n_m] = False
                a = acc[:, :n_m].double()
                if gated:
                    a = a * (c.bg_floor + (1.0 - c.bg_floor) * (1.0 - torch.exp(-gacc[:, :n_m].double())))
                tmask = touched[:, :n_m]
                if stateful:
                    vs = st.v[:, so : so + n_m]
                    ts = st.tl[:, so : so + n_m]
                    dt = tick - ts
                    keep = (ts >= 0) & (dt < DECAY_STEPS)
                    decay = decay_table[m][dt.clamp(0, DECAY_STEPS - 1)]
                    v = a + torch.where(keep, vs.double() * decay, torch.zeros_like(a))
                    vs.copy_(torch.where(tmask, v.float(), vs))
                    ts.copy_(torch.where(tmask, torch.full_like(ts, tick), ts))
                else:
                    v = a
                score = torch.where(tmask & (v > float(thr[m])), v.float(), torch.full_like(v, -math.inf, dtype=torch.float32))
                kk = min(kmod[m], n_m)
                top_v, top_i = score.topk(kk, dim=1)
                ok = torch.isfinite(top_v)
                if lif:
                    vals = torch.ones_like(top_v)
                    fired = torch.zeros(B, n_m, dtype=torch.bool, device=dev).scatter_(1, top_i, ok)
                    st.v[:, so : so + n_m].masked_fill_(fired, 0.0)
                else:
                    xg = top_v * np.float32(fparams[4])
                    vals = xg / (1.0 + xg)
                row_idx[:, koff[m] : koff[m] + kk] = torch.where(ok, top_i, torch.full_like(top_i, -1)).to(torch.int32)
                row_val[:, koff[m] : koff[m] + kk] = torch.where(ok, vals, torch.zeros_like(vals))
                if m == 3:
                    self._recall_store_torch(st, x, row_idx, row_val, pv_idx, koff, kth, khip, H, ar, out, t)
            out.idx[:, t] = row_idx
            out.val[:, t] = row_val
        st.prev_idx.copy_(out.idx[:, T - 1])
        st.prev_val.copy_(out.val[:, T - 1])

    def _recall_store_torch(self, st, x, row_idx, row_val, pv_idx, koff, kth, khip, H, ar, out, t) -> None:
        cur = row_idx[:, koff[3] : koff[4]].long()  # (B, khip)
        keys = st.hip_keys.long()  # (B, H, khip)
        hit = (keys[..., None] == cur[:, None, None, :]) & (keys[..., None] >= 0) & (cur[:, None, None, :] >= 0)
        overlap = hit.any(-1).sum(-1)  # (B, H)
        stored = torch.arange(H, device=x.device)[None, :] < st.hip_n.clamp(max=H)[:, None]
        overlap = torch.where(stored, overlap, torch.zeros_like(overlap))
        bo, best = overlap.max(1)  # first maximum
        strength = bo.double() / khip
        ok = (bo > 0) & (strength >= self.cfg.recall_threshold)
        rt = st.hip_vals[ar, best].long()
        rcode = self.code[rt.clamp_min(0)].long()
        row_idx[:, koff[6] : koff[7]] = torch.where(ok[:, None], rcode, torch.full_like(rcode, -1)).to(torch.int32)
        row_val[:, koff[6] : koff[7]] = torch.where(ok[:, None], strength.float()[:, None].expand(-1, kth),
                                                    torch.zeros(1, device=x.device))
        out.recall_token[:, t] = torch.where(ok, rt, torch.full_like(rt, -1)).to(torch.int32)
        out.recall[:, t] = torch.where(ok, strength.float(), torch.zeros_like(strength.float()))
        prev_h = pv_idx[:, koff[3] : koff[4]]
        store = prev_h[:, 0] >= 0
        slot = st.hip_n % H
        bi = ar[store]
        st.hip_keys[bi, slot[store]] = prev_h[store]
        st.hip_vals[bi, slot[store]] = x[store].to(torch.int32)
        st.hip_n += store.long()

    # ------------------------------------------------------------------ learning signals

    @torch.no_grad()
    def eligibility(self, act: Activity, prev_idx: torch.Tensor, prev_val: torch.Tensor,
                    dopamine: torch.Tensor, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dw, counts)``: per synapse ``sum_{b,t} dopamine[b,t] * pre * post`` and per neuron
        the number of tokens it was active. ``prev_*``: the state's activity before the call."""
        use_kernel = self.use_kernel() if backend is None else backend == "numba"
        proj = self.enabled_projections()
        if use_kernel:
            n = lambda t: t.numpy()  # noqa: E731
            dw, counts = K.eligibility(
                n(act.idx), n(act.val), n(prev_idx), n(prev_val), n(dopamine.float().contiguous()),
                n(self.syn_tgt), n(proj), n(self.noff), n(self.koff), n(self.kmod),
                self.n_synapses, max(1, min(K.num_threads(), act.idx.shape[0])),
            )
            return torch.from_numpy(dw), torch.from_numpy(counts)
        return self._eligibility_torch(act, prev_idx, prev_val, dopamine, proj)

    def _eligibility_torch(self, act, prev_idx, prev_val, dopamine, proj):
        B, T, _ = act.idx.shape
        dev = act.idx.device
        koff = self.koff.tolist()
        noff = self.noff.tolist()
        dw = torch.zeros(self.n_synapses, device=dev)
        counts = torch.zeros(noff[-1], device=dev)
        for m in range(len(_ALL) - 1):
            ids = act.idx[:, :, koff[m] : koff[m + 1]].long()
            ok = ids >= 0
            counts.index_add_(0, (ids[ok] + noff[m]), torch.ones(int(ok.sum()), device=dev))
        for t in range(T):
            d = dopamine[:, t].float()
            row_i, row_v = act.idx[:, t], act.val[:, t]
            pi, pvv = (prev_idx, prev_val) if t == 0 else (act.idx[:, t - 1], act.val[:, t - 1])
            post = torch.zeros(B, noff[-1] + 1, device=dev)
            for m in range(len(_ALL) - 1):
                ids = row_i[:, koff[m] : koff[m + 1]].long()
                ok = ids >= 0
                post.scatter_(1, torch.where(ok, ids + noff[m], torch.full_like(ids, noff[-1])),
                              torch.where(ok, row_v[:, koff[m] : koff[m + 1]], torch.zeros(1, device=dev)))
            post[:, noff[-1]] = 0.0
            for p in range(proj.shape[0]):
                src, tgt, off, fan, delay, _, stride = (int(v) for v in proj[p])
                si, sv = (pi, pvv) if delay == 1 else (row_i, row_v)
                si, sv = si[:, koff[src] : koff[src + 1]], sv[:, koff[src] : koff[src + 1]]
                valid = si >= 0
                j = si.clamp_min(0).long()
                ids = off + j[..., None] * stride + torch.arange(fan, device=dev)
                tgt_flat = self.syn_tgt[ids].long() + noff[tgt]
                pv = post.gather(1, tgt_flat.reshape(B, -1)).view_as(tgt_flat)
                upd = d[:, None, None] * sv[..., None] * pv * valid[..., None]
                dw.index_add_(0, ids.reshape(-1), upd.reshape(-1))
        return dw, counts

    def enabled_projections(self) -> torch.Tensor:
        """Rows of the projection table the current mechanisms use (for learning)."""
        c = self.cfg
        keep = []
        for i, (src, tgt, _, _, _) in enumerate(PROJECTIONS):
            if src == "pfc" and tgt == "thalamus" and not c.thalamic_gating:
                continue
            if src == "pfc" and tgt == "pfc" and not c.working_memory:
                continue
            if "hippocampus" in (src, tgt) or src == "recall":
                if not c.hippocampus:
                    continue
            if "basal_ganglia" in (src, tgt) and not c.basal_ganglia:
                continue
            keep.append(i)
        return self.proj[keep].contiguous()

    # ------------------------------------------------------------------ readout

    def features(self, act: Activity, tokens: torch.Tensor) -> torch.Tensor:
        """The readout's input (B*T, d): Broca's rates through the motor dictionary,
        layer-normalised, plus the thalamus-gated token embedding."""
        B, T = tokens.shape
        sl = self.module_slice("broca")
        idx = act.idx[:, :, sl].reshape(B * T, -1).long()
        val = act.val[:, :, sl].reshape(B * T, -1)
        ok = idx >= 0
        h = motor_bag(idx.clamp_min(0), torch.where(ok, val, torch.zeros_like(val)), self.motor)
        h = self.norm(h)
        if self.cfg.embedding_relay:
            h = h + act.gate.reshape(B * T, 1) * self.embed(tokens.reshape(-1))
        return h

    def readout(self, act: Activity, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, V) (log-probabilities with the adaptive softmax)."""
        B, T = tokens.shape
        return self.log_probs(self.features(act, tokens)).view(B, T, -1)

    def token_nll(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-row negative log-likelihood of ``targets`` (rows,) given features ``h`` (rows, d).
        The adaptive softmax computes a tail cluster's logits only for the rows whose target
        lies in it; the result is the exact NLL of its (normalised) distribution."""
        if self.cfg.softmax == "full":
            return F.cross_entropy(self.head(h).float(), targets, reduction="none")
        return -self.head(h.float(), self.rank[targets]).output

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the whole vocabulary (rows, V), in token-id order."""
        if self.cfg.softmax == "full":
            return F.log_softmax(self.head(h).float(), dim=-1)
        return self.head.log_prob(h.float())[:, self.rank]

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        """The most likely next token id per row."""
        if self.cfg.softmax == "full":
            return self.head(h).argmax(-1)
        return self.unrank[self.head.predict(h.float())]

    @torch.no_grad()
    def set_token_order(self, counts: torch.Tensor) -> None:
        """Order the adaptive softmax's clusters by token frequency (``counts``: (V,)): the
        most frequent tokens go to the head. Ties keep id order."""
        if self.cfg.softmax != "adaptive":
            raise UserError("token frequencies order the adaptive softmax; this brain has softmax='full'.")
        counts = torch.as_tensor(counts, dtype=torch.float64).reshape(-1)
        V = self.cfg.vocab_size
        if counts.numel() != V:
            raise UserError(f"token counts must have one entry per vocabulary id ({V}), got {counts.numel()}.")
        ids = torch.arange(V, dtype=torch.float64)
        order = torch.from_numpy(np.lexsort((ids.numpy(), -counts.numpy()))).to(self.rank.device)
        self.unrank.copy_(order)
        self.rank[order] = torch.arange(V, device=self.rank.device)

    def scalable(self) -> torch.Tensor:
        """Synapses homeostatic scaling acts on: drive into the k-WTA modules (bool, per synapse)."""
        mask = torch.zeros(self.n_synapses, dtype=torch.bool, device=self.device)
        for p in range(self.proj.shape[0]):
            src, tgt, off, fan, _, kind, stride = (int(v) for v in self.proj[p])
            if kind == 1 or _ALL[tgt] == "thalamus":
                continue
            ids = off + torch.arange(self.n_all[src], device=self.device)[:, None] * stride
            mask[(ids + torch.arange(fan, device=self.device)).reshape(-1)] = True
        return mask

    def readout_parameters(self) -> list[nn.Parameter]:
        """What the gradient trains: embeddings, motor dictionary, norm and head."""
        return [p for p in self.parameters() if p.requires_grad]
