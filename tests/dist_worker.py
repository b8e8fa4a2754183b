"""Worker for tests/test_distributed.py, launched with ``torchrun --nproc_per_node N``.

    torchrun --nproc_per_node 2 tests/dist_worker.py SPEC.json

SPEC: ``{"out": dir, "runs": [{"name", "overrides": [...], "stop_at": int|null}, ...]}``.
Runs the trainer once per entry (in order, in the same processes) and writes
``<out>/<name>.rank<R>.json`` with the per-step losses, eval records and, after every
step, fingerprints of the parameters, the optimizer state and the plasticity state; rank
0 also writes ``<out>/<name>.safetensors`` with the final parameters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from safetensors.torch import save_file  # noqa: E402

from neuroplastic.config import load_config  # noqa: E402
from neuroplastic.models.checkpoint_io import flatten_state  # noqa: E402
from neuroplastic.training.distributed import replica_fingerprint  # noqa: E402
from neuroplastic.training.trainer import Trainer  # noqa: E402


def _state_fingerprint(obj) -> str:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(obj, tensors)
    return json.dumps(skeleton, sort_keys=True) + replica_fingerprint(tensors[k] for k in sorted(tensors))


def fingerprints(trainer: Trainer) -> dict[str, str]:
    params = [p.detach() for p in trainer.model.parameters()]
    opt = trainer.optimizer.state_dict()["state"]
    opt_tensors = [v for i in sorted(opt) for _, v in sorted(opt[i].items()) if torch.is_tensor(v)]
    out = {"params": replica_fingerprint(params), "optimizer": replica_fingerprint(opt_tensors)}
    if trainer.engine is not None:
        out["plasticity"] = _state_fingerprint(trainer.engine.state_dict())
    out["data"] = json.dumps(trainer.train_data.state_dict(), sort_keys=True)
    return out


def run(entry: dict, out: Path) -> None:
    cfg = load_config("tiny", entry["overrides"])
    trainer = Trainer(cfg).setup()
    per_step: list[dict[str, str]] = []
    original = trainer.train_step

    def step():
        record = original()
        per_step.append(fingerprints(trainer))
        return record

    trainer.train_step = step
    summary = trainer.train(stop_at=entry.get("stop_at"))
    rank = trainer.dist.rank
    result = {
        "rank": rank,
        "world_size": trainer.dist.world_size,
        "strategy": trainer.dist.strategy,
        "resumed_from": summary["resumed_from"],
        "losses": [h["loss"] for h in trainer.history],
        "last_eval": summary["last_eval"],
        "fingerprints": per_step,
        "tokens_seen": trainer.tokens_seen,
        "mfu": summary["mfu"],
    }
    (out / f"{entry['name']}.rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    if rank == 0:
        from neuroplastic.models.checkpoint_io import model_tensors

        view = trainer.dist.checkpoint_state(trainer.model, trainer.optimizer)
        save_file(model_tensors(view[0]), str(out / f"{entry['name']}.safetensors"))
    elif trainer.dist.fsdp:
        trainer.dist.checkpoint_state(trainer.model, trainer.optimizer)


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    for entry in spec["runs"]:
        run(entry, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
