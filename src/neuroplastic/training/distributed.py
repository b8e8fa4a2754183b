"""Data-parallel training under ``torchrun``: DDP (gloo on CPU, nccl on CUDA) or FSDP2.

    torchrun --nproc_per_node 4 -m neuroplastic train neuroplastic-llm-small
    torchrun --nproc_per_node 8 -m neuroplastic train neuroplastic-llm-seed train.parallel=fsdp

``torchrun`` sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; :func:`setup_distributed`
reads them, joins the process group and returns a :class:`Distributed` that the trainer
asks for everything rank-dependent. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) it
is a single-process no-op and the trainer runs exactly as before.

What is guaranteed (and tested on CPU with gloo, 2 processes):

* ``train.batch_size`` is the batch *per process*. Every rank draws the same *global*
  batch of ``batch_size * world_size`` rows from the data stream (the same sampler, seed
  and position a single process would use with the whole batch) and keeps its own rows
  ``[rank*B, (rank+1)*B)``: the data are split across ranks with no overlap and no loss,
  the data position in a checkpoint is the same for every rank, and an N-process run
  follows the loss curve of a 1-process run with the N-times batch (to fp32 rounding).
* Gradients are averaged by DDP during ``backward``; rules that read gradients
  (Traces, EligibilityTrace, EWC) therefore read the all-reduced gradients. Statistics
  a rule gathers from activations (Hebbian) and the reward are combined across ranks by
  :meth:`PlasticityEngine.sync <neuroplastic.plasticity.engine.PlasticityEngine.sync>`
  before the plastic update, and the step's loss is averaged before anything reads it
  (logging, AdaptiveLR, the non-finite check). Every rank then holds bit-identical
  parameters, optimizer state and rule state after every step.
* Only rank 0 logs, shows the progress bar and writes checkpoints; every rank loads the
  checkpoint on resume. A stop request (Ctrl-C / SIGTERM) on any rank stops all ranks
  after the same step.
* ``train.parallel=fsdp`` shards parameters, gradients and optimizer state with FSDP2
  ``fully_shard`` (each block of the model's largest ``nn.ModuleList``, then the root).
  Checkpoints are gathered to full tensors on rank 0 and have the same format as
  single-process ones (a run can change strategy or world size on resume). Plasticity
  rules are not supported under FSDP yet (their buffers would have to be sharded too).

Streams that are not packed token arrays (e.g. a Hugging Face streaming dataset in a
custom loop) are split with :func:`shard_stream`.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import inspect
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroplastic.errors import UserError
from neuroplastic.models import checkpoint_io

STRATEGIES = ("auto", "ddp", "fsdp")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise UserError(f"Environment variable {name}={value!r} is not an integer; launch with torchrun.") from exc


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    return _env_int("RANK", 0)


def quiet_unless_main() -> None:
    """In a torchrun process other than rank 0, send ``print`` output (stdout) to /dev/null.

    For the command line: every rank runs the same command, rank 0 alone reports.
    Errors (stderr) still come from every rank.
    """
    import sys

    if not is_main_process():
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # kept open for the process


def is_main_process() -> bool:
    """Rank 0, or a process that was not launched as part of a group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_rank() == 0


# ---------------------------------------------------------------------------- context


@dataclass
class Distributed:
    """Where this process stands in the data-parallel group (a no-op for one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    strategy: str = "none"  # none | ddp | fsdp

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"

    # ------------------------------------------------------------ model

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module to run forward/backward through (DDP), or ``model`` sharded in place (FSDP)."""
        if not self.enabled:
            return model
        if self.strategy == "fsdp":
            return fully_shard_model(model, device, self.world_size)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        # buffers (RoPE tables, ...) are synced once at construction, not in every forward:
        # a broadcast in forward would make evaluation and sampling collectives
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
            return DDP(model, device_ids=ids, forward_sync_buffers=False)
        return DDP(model, device_ids=ids, broadcast_buffers=False)

    # ------------------------------------------------------------ data

    def shard_batches(self, source):
        """``source`` draws global batches (``batch_size * world_size`` rows); keep this rank's rows."""
        if not self.enabled:
            return source
        return ShardedBatches(source, self.rank, self.world_size)

    def local_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's equal share of the rows (dim 0) of a global batch tensor."""
        if not self.enabled:
            return t
        n = t.shape[0] // self.world_size
        return t[self.rank * n : (self.rank + 1) * n]

    # ------------------------------------------------------------ collectives

    def mean(self, values: list[float], device: torch.device) -> list[float]:
        """Means across ranks of a few scalars, in one all-reduce (identity for one process)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=_comm_device(device, self.backend))
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def agree(self, values: list[float], stop: bool, device: torch.device) -> tuple[list[float], bool]:
        """Means across ranks of ``values`` and whether any rank was asked to ``stop``, in one
        all-reduce (so that every rank acts on the same numbers and stops at the same step)."""
        *means, stops = self.mean([*values, float(stop)], device)
        return means, stops > 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    # ------------------------------------------------------------ checkpoints

    def checkpoint_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[Any, dict[str, Any]] | None:
        """``(model-like, optimizer state)`` to save, on rank 0 only (``None`` elsewhere).

        Under FSDP this gathers full tensors and is a collective: every rank calls it.
        """
        if self.fsdp and self.enabled:
            sd, osd = full_state(model, optimizer)
            if not self.is_main:
                return None
            return _StateDictView(sd), osd
        if not self.is_main:
            return None
        return model, optimizer.state_dict()

    def load_model(self, model: nn.Module, path: Path) -> None:

        if self.fsdp and self.enabled:
            load_full_model_state(model, path)
        else:
            checkpoint_io.load_model_weights(model, path)

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if self.fsdp and self.enabled:
            load_full_optimizer_state(model, optimizer, state)
        else:
            optimizer.load_state_dict(state)


def set_grad_sync(module: nn.Module, sync: bool) -> None:
    """Whether DDP all-reduces gradients in the next backward (False: accumulate locally).

    What ``DistributedDataParallel.no_sync()`` does, as a flag so that it can be set per
    micro-batch; looks through a ``torch.compile`` wrapper; a no-op for other modules.
    """
    inner = getattr(module, "_orig_mod", module)
    if hasattr(inner, "require_backward_grad_sync") and hasattr(inner, "no_sync"):
        inner.require_backward_grad_sync = bool(sync)


class NullLogger:
    """The metrics logger of ranks other than 0: records nothing."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"

    def log(self, kind: str, step: int, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _comm_device(device: torch.device, backend: str | None) -> torch.device:
    return device if backend == "nccl" else torch.device("cpu")


_OWNED_GROUP = False


def setup_distributed(parallel: str = "auto", device: torch.device | None = None) -> Distributed:
    """Join the torchrun process group (once per process) and describe this rank.

    ``parallel``: ``auto`` (DDP when launched with several processes), ``ddp`` or ``fsdp``.
    ``device``: the resolved training device (``cuda`` -> nccl, otherwise gloo).
    """
    global _OWNED_GROUP
    if parallel not in STRATEGIES:
        raise UserError(f"train.parallel must be one of {', '.join(STRATEGIES)}; got {parallel!r}.")
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else env_world_size()
    if world <= 1:
        return Distributed()
    if not dist.is_available():
        raise UserError("This PyTorch build has no torch.distributed; run with one process.")
    local_rank = _env_int("LOCAL_RANK", 0)
    cuda = device is not None and device.type == "cuda"
    if not initialized:
        for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
            if var not in os.environ:
                raise UserError(
                    f"WORLD_SIZE={world} is set but {var} is not; launch several processes with "
                    "torchrun --nproc_per_node N -m neuroplastic train ..."
                )
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        _OWNED_GROUP = True
        atexit.register(_destroy)
    backend = dist.get_backend()
    strategy = "fsdp" if parallel == "fsdp" else "ddp"
    return Distributed(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
        backend=str(backend), strategy=strategy,
    )


def _destroy() -> None:
    import torch.distributed as dist

    if _OWNED_GROUP and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def rank_device(device: torch.device, dist_ctx: Distributed) -> torch.device:
    """A plain ``cuda`` becomes ``cuda:LOCAL_RANK`` in a multi-process run."""
    if device.type != "cuda" or not dist_ctx.enabled:
        return device
    if device.index is not None:
        raise UserError(
            f"train.device={device} would put every process on the same GPU; under torchrun use "
            "train.device=cuda (or auto): each process takes the GPU of its local rank."
        )
    if dist_ctx.local_rank >= torch.cuda.device_count():
        raise UserError(
            f"Local rank {dist_ctx.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
            "start at most as many processes per node as there are GPUs."
        )
    return torch.device("cuda", dist_ctx.local_rank)


# ---------------------------------------------------------------------------- data


class ShardedBatches:
    """Rank ``rank``'s rows of every global batch that ``source`` draws.

    ``source`` (``PackedBlocks``, ``CurriculumStream``, ...) is built with the global
    batch size; its state (and therefore a checkpoint's data position) is the same on
    every rank. ``last_global`` is the latest full batch (for replay buffers, which must
    hold the same batches on every rank).
    """

    def __init__(self, source, rank: int, world_size: int):
        if source.batch_size % world_size:
            raise UserError(
                f"The global batch of {source.batch_size} rows does not split over "
                f"{world_size} processes."
            )
        self.source = source
        self.rank = rank
        self.world_size = world_size
        self.last_global: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return self.source.batch_size // self.world_size

    @property
    def tokens_per_batch(self) -> int:
        return self.source.tokens_per_batch // self.world_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.source.next_batch()
        self.last_global = (x, y)
        n = x.shape[0] // self.world_size
        lo, hi = self.rank * n, (self.rank + 1) * n
        return x[lo:hi], y[lo:hi]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)

    def __getattr__(self, name: str):
        # epoch, schedule, loaders, ...: the wrapped stream's
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)


def shard_stream(data: Any, rank: int | None = None, world_size: int | None = None) -> Any:
    """This rank's share of a stream of examples, disjoint from every other rank's.

    Hugging Face ``datasets.Dataset`` / ``IterableDataset`` (streaming) go through
    ``datasets.distributed.split_dataset_by_node`` (whole shards per rank when the
    number of shards divides by the world size, otherwise every ``world_size``-th
    example); any other iterable yields items ``rank, rank + world_size, ...``. The
    union over ranks is the whole stream. ``rank`` / ``world_size`` default to the
    process group (or torchrun's environment).
    """
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = env_rank(), env_world_size()
    if not 0 <= rank < world_size:
        raise UserError(f"Rank {rank} is outside a world of {world_size} processes.")
    if world_size == 1:
        return data
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is in the hf extra
        datasets = None
    if datasets is not None and isinstance(data, datasets.Dataset | datasets.IterableDataset):
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(data, rank=rank, world_size=world_size)
    if isinstance(data, Iterable):
        return itertools.islice(data, rank, None, world_size)
    raise UserError(f"Cannot shard a {type(data).__name__}; pass an iterable or a Hugging Face dataset.")


# ---------------------------------------------------------------------------- FSDP2


def _block_list(model: nn.Module) -> list[nn.Module]:
    """The children of the largest ``nn.ModuleList`` whose items share one class (the blocks)."""
    best: list[nn.Module] = []
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > len(best):
            kinds = {type(m) for m in mod}
            if len(kinds) == 1:
                best = list(mod)
    return best


def fully_shard_model(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """FSDP2: shard each block, then the root (in place); returns ``model``."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # pragma: no cover - torch < 2.6
        raise UserError(
            "train.parallel=fsdp needs PyTorch >= 2.6 (FSDP2 fully_shard); use train.parallel=ddp."
        ) from exc
    mesh = init_device_mesh(device.type, (world_size,))
    for block in _block_list(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    generate = getattr(model, "generate", None)
    if callable(generate):
        # FSDP gathers the root's own parameters (embeddings, final norm) in forward();
        # generation may use them outside forward (prefill, next-token logits)
        def generate_unsharded(*args, **kwargs):
            model.unshard()
            try:
                return generate(*args, **kwargs)
            finally:
                model.reshard()

        model.generate = generate_unsharded
    return model


class _StateDictView:
    """Something with ``state_dict()``, for ``checkpoint.save_checkpoint(model=...)``."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        self._sd = sd

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._sd


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's own order (the integer ids of its state dict)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state on rank 0, in the single-process format.

    A collective: every rank calls it; ranks other than 0 get empty dicts.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    if not sd:
        return {}, {}
    # FQN-keyed -> the integer ids of optimizer.state_dict(), so that checkpoints do not
    # depend on the strategy
    names = _param_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    state = {index[k]: v for k, v in osd["state"].items()}
    groups = []
    for g in osd["param_groups"]:
        g = dict(g)
        g["params"] = [index[n] for n in g["params"]]
        groups.append(g)
    return sd, {"state": state, "param_groups": groups}


def load_full_model_state(model: nn.Module, path: Path) -> None:
    """Load a full ``model.safetensors`` into a sharded model (every rank reads the file)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict


    tensors = checkpoint_io.load_safetensors(path)
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    unexpected = [k for k in tensors if k not in names]
    missing = [n for n, _ in model.named_parameters() if n not in tensors]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(
            f"Checkpoint {str(path)!r} does not fit this model ({what}); "
            "it was saved from a different architecture."
        )
    for n, p in model.named_parameters():
        if tuple(tensors[n].shape) != tuple(p.shape):
            raise UserError(
                f"Checkpoint {str(path)!r} has {n} of shape {tuple(tensors[n].shape)} but the "
                f"model expects {tuple(p.shape)}; load it with the model config it was trained with."
            )
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a single-process-format optimizer state into a sharded model's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    try:
        osd = {
            "state": {names[int(i)]: v for i, v in state["state"].items()},
            "param_groups": [
                {**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]
            ],
        }
    except (IndexError, KeyError, ValueError) as exc:
        raise ValueError(f"optimizer state does not match the parameters ({exc})") from exc
    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=osd, options=StateDictOptions(full_state_dict=True)
    )


# ---------------------------------------------------------------------------- checks


def replica_fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 of the bytes (and shapes, dtypes) of local tensors: equal strings = identical values."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach()
        if hasattr(t, "to_local"):
            t = t.to_local()
        t = t.cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
