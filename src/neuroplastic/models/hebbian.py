"""AGIFORMER: a byte-level language model with Hebbian fast-weight memory.

``HebbianLM(cfg)`` (``model.arch=hebbian``) has the public API of
:class:`neuroplastic.models.transformer.GPT` (``forward``, ``generate``, ``num_params``,
``flops_per_token``, ``config``, ``init_weights``), so the trainer, scorers and CLI use
it unchanged. The blocks' shape (``n_layer``, ``n_head``, ``n_embd``, ...) comes from the
config's ``gpt`` section, the memory's settings (``window``, ``memory_rule``, ...) from its
``hebbian`` section. Each of the ``n_layer`` pre-norm residual blocks is::

    h = norm(x)
    q, k, v = split(c_attn(h))                       # one projection, shared (below)
    a = local_attention(rope(q), rope(k), v)         # causal, the last `window` tokens
    m = rmsnorm(fast_weight(phi(q), phi(k), v, log lambda))   # memory, per memory head
    x = x + c_proj((1 - sigmoid(g)) * a + sigmoid(g) * m)     # learned per-channel gate
    x = x + mlp(norm(x))

- **Local attention**: :func:`torch.nn.functional.scaled_dot_product_attention` with a
  banded causal mask (query ``i`` sees keys ``i - window < j <= i``) and RoPE at absolute
  positions; ``n_head`` heads. When ``window >= T`` the plain causal kernel is used; when
  ``T >= 4 window`` a blockwise kernel (:func:`blocked_local_attention`, ``O(T window)``
  instead of a ``(T, T)`` masked product; the needle-recall model's forward + backward on
  2 x 2048 bytes, window 8: 234 -> 130 ms on 2 CPU threads).
- **Memory** (:func:`neuroplastic.ops.fast_weight.fast_weight`):
  ``M_t = lambda M_{t-1} + k_t v_t^T``, ``o_t = q_t M_t`` (``memory_rule=hebbian``) or the
  gated delta rule ``M' = lambda M_{t-1}``, ``M_t = M' + beta_t k_t (v_t - M'^T k_t)^T`` with
  ``beta_t = sigmoid(linear(h_t))`` per memory head (``memory_rule=delta``; plus a
  learned bias initialised to ``model.beta_bias`` when that is set; q and k are then
  L2-normalised after the feature map so that the update is a contraction).
  ``memory_heads`` heads (``0``: ``n_head``) of size ``n_embd / memory_heads``; q and k go
  through ``feature_map(x, cfg.hebbian.feature_map)`` without RoPE (the memory has no positions
  and no length limit). Each head's output is RMS-normalised (a learned weight shared by
  heads, as GLA/RetNet do) because an undecayed sum grows with the sequence length.
  Training uses the chunk-parallel kernel (``mode="chunked"``, ``cfg.hebbian.chunk_size``);
  single-token decoding uses the recurrent form with the carried state.
- **Shared projections** (as in Infini-attention, arXiv 2404.07143): attention and memory
  read the same q, k, v and write through the same ``c_proj``; the memory views the
  ``n_embd`` channels as ``memory_heads`` heads. So a block costs what a GPT block costs
  plus ``n_embd`` gate logits, ``memory_heads`` decay logits, ``n_embd / memory_heads``
  norm weights (and ``n_embd * memory_heads`` for the delta rule's beta).
- **Memory inputs** (``model.memory_qkv``, ``model.conv_size``, ``model.conv_init``):
  ``shared`` (default) feeds the memory the attention's q/k/v; ``own`` gives it its own
  projection (``3 n_embd^2`` more parameters per layer). ``conv_size > 0`` runs a causal
  depthwise convolution over the memory's q/k/v; ``conv_init=shift`` starts it as a pure
  shift: q and v see this token, k the token before. With ``own`` the key projection
  is also initialised equal to the query's, so at step 0 ``q_t . k_s`` compares token
  ``t`` with token ``s - 1`` and a read returns what followed earlier occurrences of this
  token: the memory starts as an induction head instead of having to discover one. This
  is what makes needle recall learnable on a CPU budget (docs/BENCHMARKS.md, "needle":
  with torch's random conv init and shared projections, recall stays at chance).
- **Decay**: per layer and memory head, ``lambda = (0.99 + 0.01 * sigmoid(p)) * alpha``
  with ``p`` a learned per-head logit (initialised from ``model.decay_logit_init``, by
  default spread over ``[-3, 3]`` across heads:
  horizons from ~100 to ~2000 tokens at ``alpha = 1``) and ``alpha`` the developmental
  curriculum's value, a buffer in the state dict (checkpoints restore it):
  :meth:`HebbianLM.set_alpha`, ``float(model.alpha)``. ``log lambda`` is computed as
  ``log(0.99) + log1p(sigmoid(p) / 99) + log(alpha)`` in float32 (every term <= 0).
  There is no data-dependent (per-token) decay term: lambda is constant in time, so the
  curriculum's alpha is the only thing that moves it besides learning ``p``.
  :meth:`HebbianLM.decay_rates` returns the current lambdas ``(n_layer, memory_heads)``.

Lengths: ``block_size`` bounds the training/forward length (``T > block_size`` raises
``ValueError`` like GPT). Generation never crops: it carries, per layer, the memory state
(fp32, ``(B, H, dk, dv)``) and the last ``window - 1`` keys/values of the local attention
(:class:`HebbianState`), so it continues past ``block_size`` at constant cost per token
with RoPE at the true absolute positions (attention only ever sees relative distances
``< window``); prompts longer than ``block_size`` are prefilled in ``block_size`` pieces.
The carried-state tokens equal re-running the whole sequence at every step.

Baseline of the same size: ``model.arch=gpt`` with the same ``n_layer`` / ``n_head`` /
``n_embd`` / ``mlp_ratio`` (e.g. ``neuroplastic train agiformer model.arch=gpt``). Thanks
to the shared projections the parameter counts differ by well under 1% (hebbian rule,
n_layer=4, n_embd=128, n_head=4, vocab 256: 821,008 vs 820,352 parameters, +0.08%; the
delta rule adds ``n_layer * n_embd * memory_heads``: 823,056); the tests check 10%.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from neuroplastic.config import GPTConfig, HebbianConfig, ModelConfig
from neuroplastic.errors import UserError
from neuroplastic.models.api import LanguageModel
from neuroplastic.models.transformer import (
    MLP,
    apply_rope,
    check_config,
    generate_loop,
    gpt2_init_,
    make_norm,
    rope_angles,
)
from neuroplastic.ops.fast_weight import FEATURE_MAPS, fast_weight, feature_map

__all__ = ["HebbianLM", "HebbianState"]

MEMORY_RULES = ("hebbian", "delta")
_LOG_099 = math.log(0.99)


class HebbianState:
    """What generation carries between forwards, per layer: the fast-weight memory state
    ``(B, H, dk, dv)`` in float32 and the keys/values ``(B, n_head, <= window - 1, hd)`` of
    the most recent positions for the local attention. ``pos`` counts the positions seen
    (the absolute RoPE position of the next token); the model advances it per forward."""

    def __init__(self, n_layer: int, window: int):
        self.n_layer = n_layer
        self.window = window
        self.reset()

    def reset(self) -> None:
        self.pos = 0
        self.memory: list[torch.Tensor | None] = [None] * self.n_layer
        self.k: list[torch.Tensor | None] = [None] * self.n_layer
        self.v: list[torch.Tensor | None] = [None] * self.n_layer
        self.conv: list[torch.Tensor | None] = [None] * self.n_layer

    @property
    def cached(self) -> int:
        """Number of past positions whose keys/values are kept (the same for all layers)."""
        return 0 if self.k[0] is None else self.k[0].size(2)

    def update_kv(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepend the kept keys/values to ``k``, ``v`` ``(B, nh, T, hd)``; keep the last
        ``window - 1`` of the result for the next forward and return all of it."""
        if self.k[layer] is not None:
            k = torch.cat((self.k[layer], k), dim=2)
            v = torch.cat((self.v[layer], v), dim=2)
        start = max(0, k.size(2) - (self.window - 1))
        self.k[layer], self.v[layer] = k[:, :, start:], v[:, :, start:]
        return k, v


def _check_hebbian_config(cfg: ModelConfig) -> None:
    if cfg.vocab_size <= 0:
        raise UserError(
            f"model.vocab_size must be positive to build the hebbian model, got "
            f"{cfg.vocab_size}; set it from the tokenizer before building the model."
        )
    check_config(cfg)
    g, mem = cfg.gpt, cfg.hebbian
    if g.pos != "rope":
        raise UserError(
            f"model.arch=hebbian uses RoPE positions (generation runs past block_size); "
            f"set model.pos=rope instead of {g.pos!r}."
        )
    if mem.window < 1:
        raise UserError(f"model.window must be at least 1 (tokens of local attention), got {mem.window}.")
    if mem.memory_heads < 0:
        raise UserError(f"model.memory_heads must be >= 0 (0: model.n_head), got {mem.memory_heads}.")
    heads = mem.memory_heads or g.n_head
    if g.n_embd % heads:
        raise UserError(
            f"model.n_embd ({g.n_embd}) must be divisible by the number of memory heads "
            f"({heads}); change model.memory_heads."
        )
    if mem.memory_rule not in MEMORY_RULES:
        raise UserError(
            f"model.memory_rule must be one of {', '.join(MEMORY_RULES)}; got {mem.memory_rule!r}."
        )
    if mem.feature_map not in FEATURE_MAPS:
        raise UserError(
            f"model.feature_map must be one of {', '.join(FEATURE_MAPS)}; got {mem.feature_map!r}."
        )
    if mem.chunk_size < 1:
        raise UserError(f"model.chunk_size must be a positive integer, got {mem.chunk_size}.")
    if mem.conv_size < 0:
        raise UserError(f"model.conv_size must be >= 0 (0: no convolution), got {mem.conv_size}.")
    if mem.conv_init not in ("random", "shift"):
        raise UserError(f"model.conv_init must be random or shift; got {mem.conv_init!r}.")
    if mem.conv_init == "shift" and mem.conv_size < 2:
        raise UserError(
            f"model.conv_init=shift gives the memory's keys the previous token, which needs "
            f"model.conv_size >= 2 (got {mem.conv_size})."
        )
    if len(mem.decay_logit_init) not in (0, 1, heads):
        raise UserError(
            f"model.decay_logit_init takes no value, one for every memory head, or one per "
            f"memory head ({heads}); got {len(mem.decay_logit_init)} values."
        )
    if mem.memory_qkv not in ("shared", "own"):
        raise UserError(f"model.memory_qkv must be shared or own; got {mem.memory_qkv!r}.")
    _check_alpha(mem.alpha, UserError, "model.alpha")


def _check_alpha(alpha: float, exc: type[Exception], name: str) -> None:
    if not (isinstance(alpha, int | float) and 0.0 < alpha <= 1.0):
        raise exc(f"{name} must be in (0, 1] (it scales the memory decay), got {alpha!r}.")


def _blocked(T: int, past: int, window: int) -> bool:
    """Whether the local attention of a ``T``-token forward after ``past`` kept tokens runs
    blockwise (:func:`blocked_local_attention`) rather than with a (T, T) banded mask."""
    return past == 0 and T >= 4 * window


def blocked_local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, dropout_p: float = 0.0
) -> torch.Tensor:
    """Causal sliding-window attention, query ``i`` seeing keys ``i - window < j <= i``, in
    ``O(T * window)``: the sequence is cut into blocks of ``window`` positions and each block
    attends to itself and the block before (``2 * window`` keys, a fixed band mask), instead
    of one ``(T, T)`` masked product that is almost all masked out when ``window << T``.
    ``q, k, v``: ``(B, H, T, D)``; returns ``(B, H, T, D)``. Equals SDPA with the banded mask."""
    B, H, T, D = q.shape
    W = window
    nb = -(-T // W)
    pad = nb * W - T
    if pad:  # padded keys come after every real query, so no real query sees them
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    kp, vp = (F.pad(t, (0, 0, W, 0)) for t in (k, v))  # a zero block before the first

    def pairs(t: torch.Tensor) -> torch.Tensor:  # (B, H, nb, 2W, D): block before + this one
        return torch.cat((t[:, :, :-W].view(B, H, nb, W, D), t[:, :, W:].view(B, H, nb, W, D)), dim=3)

    r = torch.arange(W, device=q.device)[:, None]
    c = torch.arange(2 * W, device=q.device)[None, :]
    mask = ((c > r) & (c <= r + W)).expand(nb, W, 2 * W).clone()
    mask[0, :, :W] = False  # the zero block before the sequence
    out = F.scaled_dot_product_attention(
        q.view(B, H, nb, W, D), pairs(kp), pairs(vp), attn_mask=mask, dropout_p=dropout_p
    )
    return out.reshape(B, H, nb * W, D)[:, :, :T]


# --------------------------------------------------------------------------- layers


class LocalAttentionMemory(nn.Module):
    """Sliding-window attention and fast-weight memory on shared q/k/v, gated together:
    the attention's shape from ``cfg`` (the model's ``gpt`` section), the memory's settings
    from ``mem`` (its ``hebbian`` section)."""

    def __init__(self, cfg: GPTConfig, mem: HebbianConfig):
        super().__init__()
        C = cfg.n_embd
        self.n_head = cfg.n_head
        self.head_dim = C // cfg.n_head
        self.rope_pairing = cfg.rope_pairing
        self.window = mem.window
        self.mem_heads = mem.memory_heads or cfg.n_head
        self.mem_dim = C // self.mem_heads
        self.rule = mem.memory_rule
        self.feature = mem.feature_map
        self.chunk_size = mem.chunk_size
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(C, 3 * C, bias=cfg.bias)
        self.c_proj = nn.Linear(C, C, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.decay_logit = nn.Parameter(torch.empty(self.mem_heads))  # p, per memory head
        self.decay_init = [float(p) for p in mem.decay_logit_init]
        self.gate = nn.Parameter(torch.empty(C))  # sigmoid(gate): the memory's share
        self.mem_norm = nn.RMSNorm(self.mem_dim, eps=1e-5)
        self.beta_bias = mem.beta_bias
        self.beta_proj = (
            nn.Linear(C, self.mem_heads, bias=cfg.bias or mem.beta_bias is not None)
            if self.rule == "delta" else None
        )
        self.conv_size = mem.conv_size
        self.conv_init = mem.conv_init
        self.mem_attn = nn.Linear(C, 3 * C, bias=cfg.bias) if mem.memory_qkv == "own" else None
        self.mem_conv = (
            nn.Conv1d(3 * C, 3 * C, mem.conv_size, groups=3 * C, bias=False) if mem.conv_size else None
        )

    @torch.no_grad()
    def reset_memory_parameters(self) -> None:
        if self.decay_init:
            self.decay_logit.copy_(torch.tensor(self.decay_init, dtype=torch.float32).expand(self.mem_heads))
        elif self.mem_heads > 1:
            self.decay_logit.copy_(torch.linspace(-3.0, 3.0, self.mem_heads))
        else:
            self.decay_logit.zero_()
        self.gate.zero_()
        if self.beta_proj is not None and self.beta_proj.bias is not None:
            self.beta_proj.bias.fill_(self.beta_bias or 0.0)
        if self.mem_conv is not None:
            self.mem_conv.reset_parameters()
            if self.conv_init == "shift":
                # taps are ordered oldest .. newest: the last one is this token (lag 0)
                C, K = self.mem_conv.in_channels // 3, self.conv_size
                self.mem_conv.weight.zero_()
                self.mem_conv.weight[:C, 0, K - 1] = 1.0  # q: this token
                self.mem_conv.weight[C : 2 * C, 0, K - 2] = 1.0  # k: the token before
                self.mem_conv.weight[2 * C :, 0, K - 1] = 1.0  # v: this token
                if self.mem_attn is not None:
                    # keys through the queries' projection: q_t . k_s compares this token
                    # with the one before s, so reading returns what followed a match
                    self.mem_attn.weight[C : 2 * C].copy_(self.mem_attn.weight[:C])

    def _short_conv(self, qkv: torch.Tensor, state: HebbianState | None, layer: int) -> torch.Tensor:
        """Causal depthwise convolution of ``qkv`` ``(B, T, 3C)`` over the last ``conv_size``
        positions (the memory's q/k/v then carry their local context, as in DeltaNet/GLA);
        with a state, the previous ``conv_size - 1`` inputs are carried across forwards."""
        K = self.conv_size
        x = qkv.transpose(1, 2)  # (B, 3C, T)
        prev = None if state is None else state.conv[layer]
        if prev is None:
            prev = x.new_zeros(x.size(0), x.size(1), K - 1)
        x = torch.cat((prev.to(x.dtype), x), dim=2)
        if state is not None:
            state.conv[layer] = x[:, :, x.size(2) - (K - 1):]
        return self.mem_conv(x).transpose(1, 2)

    def log_decay(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """``log lambda`` per memory head ``(H,)`` in float32, every term <= 0."""
        s = torch.sigmoid(self.decay_logit.float())
        return _LOG_099 + torch.log1p(s / 99.0) + log_alpha.float()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None,
        log_alpha: torch.Tensor,
        state: HebbianState | None,
        layer: int,
        mode: str | None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x)
        q, k, v = qkv.split(C, dim=-1)

        # local attention: n_head heads, RoPE, banded causal mask
        qa = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        ka = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        va = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        qa, ka = (apply_rope(t, *rope, pairing=self.rope_pairing) for t in (qa, ka))
        if state is not None:
            ka, va = state.update_kv(layer, ka, va)
        p_drop = self.dropout if self.training else 0.0
        if _blocked(T, ka.size(2) - T, self.window):  # no kept keys before this forward
            a = blocked_local_attention(qa, ka, va, self.window, p_drop)
        else:
            is_causal = attn_mask is None and ka.size(2) == T and T > 1
            a = F.scaled_dot_product_attention(
                qa, ka, va, attn_mask=attn_mask, dropout_p=p_drop, is_causal=is_causal
            )
        a = a.transpose(1, 2).reshape(B, T, C)

        # fast-weight memory: mem_heads heads, no positions
        H, d = self.mem_heads, self.mem_dim
        if self.mem_attn is not None:
            qkv = self.mem_attn(x)
            q, k, v = qkv.split(C, dim=-1)
        if self.mem_conv is not None:
            q, k, v = self._short_conv(qkv, state, layer).split(C, dim=-1)
        qm = feature_map(q.view(B, T, H, d).transpose(1, 2), self.feature)
        km = feature_map(k.view(B, T, H, d).transpose(1, 2), self.feature)
        vm = v.view(B, T, H, d).transpose(1, 2)
        beta = None
        if self.rule == "delta":
            if self.feature != "identity_l2":
                qm, km = F.normalize(qm, dim=-1), F.normalize(km, dim=-1)
            beta = torch.sigmoid(self.beta_proj(x).float()).transpose(1, 2)  # (B, H, T)
        log_decay = self.log_decay(log_alpha).view(1, H, 1).expand(B, H, T)
        if mode is None:
            mode = "recurrent" if T == 1 else "chunked"
        m, new_state = fast_weight(
            qm, km, vm, log_decay,
            rule=self.rule,
            beta=beta,
            mode=mode,
            chunk_size=self.chunk_size,
            initial_state=None if state is None else state.memory[layer],
        )
        if state is not None:
            state.memory[layer] = new_state
        m = self.mem_norm(m.float()).to(a.dtype).transpose(1, 2).reshape(B, T, C)

        g = torch.sigmoid(self.gate).to(a.dtype)
        return self.resid_dropout(self.c_proj(a + g * (m - a)))


class HebbianBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, mem: HebbianConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.mix = LocalAttentionMemory(cfg, mem)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, attn_mask, log_alpha, state, layer, mode):
        x = x + self.mix(self.ln_1(x), rope, attn_mask, log_alpha, state, layer, mode)
        x = x + self.mlp(self.ln_2(x))
        return x


# --------------------------------------------------------------------------- model


class HebbianLM(LanguageModel):
    """Byte-level LM with local attention and Hebbian fast-weight memory (module docstring).

    ``logits, loss = model(idx, targets)`` as for GPT. ``model(idx, state=s)`` continues
    from a :class:`HebbianState` (updated in place); ``mode`` forces the memory kernel
    (``"chunked"`` or ``"recurrent"``; default: chunked, recurrent for a single token).
    """

    #: the recurrent memory carries context past block_size (generate does not crop)
    supports_long_context = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        _check_hebbian_config(cfg)
        self.config = cfg
        g, mem = cfg.gpt, cfg.hebbian
        self.head_dim = g.n_embd // g.n_head
        self.mem_heads = mem.memory_heads or g.n_head
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, g.n_embd),
                drop=nn.Dropout(g.dropout),
                h=nn.ModuleList(HebbianBlock(g, mem) for _ in range(g.n_layer)),
                ln_f=make_norm(g),
            )
        )
        self.lm_head = None if g.tie_weights else nn.Linear(g.n_embd, cfg.vocab_size, bias=False)
        self.register_buffer("alpha", torch.tensor(float(mem.alpha), dtype=torch.float32))
        self.init_weights()

    # ------------------------------------------------------------------ init / stats

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init as in :meth:`GPT.init_weights` (residual ``c_proj`` at
        0.02 / sqrt(2 n_layer)), decay logits spread over [-3, 3] across heads, gates at 0
        (memory and attention mixed half and half), ``alpha`` from the config."""
        gpt2_init_(self, self.config.gpt.n_layer)
        for module in self.modules():
            if isinstance(module, LocalAttentionMemory):
                module.reset_memory_parameters()
        self.alpha.fill_(float(self.config.hebbian.alpha))

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (GPT's convention: with ``non_embedding`` the token
        embedding counts only when tied to the output projection)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.lm_head is not None:
            n -= self.transformer["wte"].weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): ``6 N`` plus attention
        ``12 L H Q min(T, window)`` (each query sees at most ``window`` keys) plus memory
        ``12 L Hm dk dv`` (a rank-1 state update and a state read of ``dk * dv`` each).
        The chunked kernel's intra-chunk products are not counted."""
        cfg, g = self.config, self.config.gpt
        T = cfg.block_size if seq_len is None else seq_len
        attn = 12 * g.n_layer * g.n_head * self.head_dim * min(T, cfg.hebbian.window)
        d = g.n_embd // self.mem_heads
        mem = 12 * g.n_layer * self.mem_heads * d * d
        return float(6 * self.num_params(True) + attn + mem)

    # ------------------------------------------------------------------ decay

    def set_alpha(self, alpha: float) -> None:
        """Set the developmental decay scale ``alpha`` in (0, 1] (kept in the state dict)."""
        _check_alpha(alpha, ValueError, "alpha")
        with torch.no_grad():
            self.alpha.fill_(float(alpha))

    @torch.no_grad()
    def decay_rates(self) -> torch.Tensor:
        """The current ``lambda`` per layer and memory head, ``(n_layer, memory_heads)``."""
        log_alpha = self.alpha.float().log()
        return torch.stack([b.mix.log_decay(log_alpha).exp() for b in self.transformer["h"]])

    # ------------------------------------------------------------------ forward

    def _output_weight(self) -> torch.Tensor:
        return self.transformer["wte"].weight if self.lm_head is None else self.lm_head.weight

    def new_state(self) -> HebbianState:
        return HebbianState(self.config.gpt.n_layer, self.config.hebbian.window)

    def _attn_mask(self, T: int, past: int, device: torch.device) -> torch.Tensor | None:
        """Boolean ``(T, past + T)`` mask: query ``i`` (after ``past`` kept keys) sees key
        ``j`` iff ``past + i - window < j <= past + i``. ``None`` where SDPA needs none:
        no past and ``T <= window`` (plain causal), a single query (sees all kept keys), or
        a forward long enough for the blockwise kernel (:func:`blocked_local_attention`)."""
        W = self.config.hebbian.window
        if T == 1 or (past == 0 and T <= W) or _blocked(T, past, W):
            return None
        rel = torch.arange(past + T, device=device)[None, :] - torch.arange(T, device=device)[:, None]
        return (rel <= past) & (rel > past - W)

    def _hidden(
        self, idx: torch.Tensor, state: HebbianState | None = None, mode: str | None = None
    ) -> torch.Tensor:
        """Final-normed hidden states ``(B, T, C)``."""
        cfg = self.config
        B, T = idx.shape
        if T > cfg.block_size:
            raise ValueError(
                f"Cannot forward a sequence of length {T}: the model's block_size is "
                f"{cfg.block_size}. Crop the input to the last {cfg.block_size} tokens, or "
                "feed it in pieces with a carried state (model.new_state())."
            )
        past = 0 if state is None else state.pos
        kept = 0 if state is None else state.cached
        rope = rope_angles(torch.arange(past, past + T, device=idx.device), self.head_dim, cfg.gpt.rope_theta)
        attn_mask = self._attn_mask(T, kept, idx.device)
        log_alpha = self.alpha.float().log()
        x = self.transformer["drop"](self.transformer["wte"](idx))
        for i, block in enumerate(self.transformer["h"]):
            x = block(x, rope, attn_mask, log_alpha, state, i, mode)
        if state is not None:
            state.pos += T
        return self.transformer["ln_f"](x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        state: HebbianState | None = None,
        mode: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self._hidden(idx, state, mode)
        logits = F.linear(x, self._output_weight())
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
        return logits, loss

    # ------------------------------------------------------------------ generation

    def _prefill(self, idx: torch.Tensor, state: HebbianState) -> torch.Tensor:
        """Run ``idx`` through ``state`` in pieces of at most ``block_size``; the last
        position's hidden state ``(B, C)``."""
        bs = self.config.block_size
        h = None
        for start in range(0, idx.size(1), bs):
            h = self._hidden(idx[:, start : start + bs], state)
        return h[:, -1]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``idx`` ``(B, T)`` by up to ``max_new_tokens`` tokens; returns
        ``(B, T + new)``. Sampling options as :meth:`GPT.generate`.

        With ``use_cache`` the prompt is prefilled once (chunked memory kernel) and each
        new token is fed alone with the carried :class:`HebbianState` (recurrent kernel,
        the last ``window - 1`` keys/values). Without it the whole sequence is recomputed
        from scratch at every step. Neither crops: the memory has no length limit and
        sequences longer than ``block_size`` are processed in ``block_size`` pieces.
        """
        state = self.new_state() if use_cache else None

        def next_logits(out: torch.Tensor) -> torch.Tensor:
            if state is not None and state.pos > 0:
                h = self._hidden(out[:, -1:], state)[:, -1]
            else:
                h = self._prefill(out, state if state is not None else self.new_state())
            return F.linear(h, self._output_weight())

        return generate_loop(self, idx, max_new_tokens, next_logits, temperature, top_k, top_p,
                             eos_id, generator)
