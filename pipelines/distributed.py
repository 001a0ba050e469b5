"""Data-parallel training over several processes (GPUs, or CPU processes), one or more machines.

studio.worker starts the processes with `accelerate launch` on GPUs and with torchrun (the launcher
accelerate uses underneath) on CPUs, where accelerate's own multi-CPU path wants mpirun. Each process
learns its place from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins the process
group through accelerate (NCCL on GPUs, gloo on CPUs).

How the loop uses it (pipelines/training.py): every process builds the same epoch of batches; a step's
global chunk is `gradient_accumulation x world` batches and process r takes every world-th one from r.
After the backward passes one all-reduce averages the adapter's gradients (what DDP does; LoRA gradients
are small, so one flat buffer is enough) together with the step's loss (NaN anywhere makes it NaN
everywhere), unit count and the stop flag, so all processes take the same decision at the same step. Only rank 0 writes events,
checkpoints, samples and the adapter. Each process records its own state in `ranks/rank-N.json`.

Strategy fsdp (`shard_frozen_weights`) also splits the frozen base model's blocks between the processes with
torch's FSDP; the adapter's weights stay whole everywhere, so everything above works unchanged, except that
a forward pass now needs every process: evaluation and samples run on all ranks (rank 0 still writes).

Imports torch only where it needs it: the UI reads rank states through this module.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RANKS_DIR = "ranks"


@dataclass(frozen=True)
class Place:
    """This process's place among the run's processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def place() -> Place:
    """Read from the launcher's environment; a process started without a launcher is rank 0 of 1."""
    env = os.environ
    return Place(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def join(use_gpu: bool) -> Place:
    """Join the process group the launcher set up (no-op for a single process)."""
    import torch
    here = place()
    if here.distributed and not torch.distributed.is_initialized():
        from accelerate import PartialState
        PartialState(cpu=not use_gpu)  # reads the launcher's env, picks NCCL or gloo, sets this GPU
    return here


def all_reduce_step(gradients: list[torch.Tensor], stats: list[float], world: int) -> list[float]:
    """Average `gradients` in place over all processes and sum `stats`; returns the summed stats."""
    import torch
    device = gradients[0].device if gradients else torch.device("cpu")
    flat = torch.cat([g.reshape(-1) for g in gradients] + [torch.tensor(stats, dtype=gradients[0].dtype if gradients
                                                                       else torch.float32, device=device)])
    torch.distributed.all_reduce(flat)
    offset = 0
    for g in gradients:
        g.copy_(flat[offset:offset + g.numel()].view_as(g) / world)
        offset += g.numel()
    return flat[offset:].tolist()


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The elements of the outermost module lists that hold frozen weights: a transformer's layers, a UNet's
    down and up blocks, Whisper's encoder and decoder blocks. FSDP gathers one such block at a time."""
    import torch
    found = []

    def visit(module: torch.nn.Module) -> None:
        for child in module.children():
            if isinstance(child, torch.nn.ModuleList):
                found.extend(child)
            else:
                visit(child)

    visit(model)
    return [block for block in found if any(not p.requires_grad for p in block.parameters())]


def shard_frozen_weights(model: torch.nn.Module, device: torch.device) -> int:
    """FSDP (torch's fully_shard) over the model's repeated blocks: each process keeps 1/world of their frozen
    weights and gathers a block's whole weights only for its forward and backward. The trainable adapter
    weights are left out of FSDP, whole on every process. Returns how many blocks were split."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (place().world,))
    blocks = repeated_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params={p for p in block.parameters() if p.requires_grad})
    return len(blocks)


def held_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of model weights this process holds (its own shards only, under fsdp)."""
    from torch.distributed.tensor import DTensor
    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())


def free_port() -> int:
    """A TCP port nobody listens on now, for a single machine's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- each rank's state, for the UI and the worker that waits on them -------------------------

class RankStatus:
    """`ranks/rank-N.json`: this process's host, device, step and state. Written atomically, at most
    once a second while training, so watching costs the loop nothing."""

    def __init__(self, run_dir: str | Path, here: Place, device: torch.device | str):
        self.path = Path(run_dir) / RANKS_DIR / f"rank-{here.rank}.json"
        self.info = {"rank": here.rank, "world": here.world, "host": socket.gethostname(), "pid": os.getpid(),
                     "device": str(device), "step": 0, "state": "starting"}
        self._written = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def update(self, force: bool = False, **changes) -> None:
        self.info.update(changes)
        now = time.time()
        if not force and now - self._written < 1.0:
            return
        self.info["updated"] = round(now, 3)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.info))
        os.replace(tmp, self.path)
        self._written = now


    def finish(self, state: str, **details) -> None:
        """The final state, keeping the last step the training loop recorded in the same file."""
        try:
            self.info.update(json.loads(self.path.read_text()))
        except (OSError, json.JSONDecodeError):
            pass
        self.update(force=True, state=state, **details)


def read_ranks(run_dir: str | Path) -> list[dict]:
    """Every rank's last recorded state, by rank."""
    folder = Path(run_dir) / RANKS_DIR
    found = []
    for path in folder.glob("rank-*.json") if folder.is_dir() else []:
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # being replaced this instant
    return sorted(found, key=lambda r: r["rank"])


def clear_ranks(run_dir: str | Path) -> None:
    """Forget the previous attempt's ranks before a new launch (resume)."""
    folder = Path(run_dir) / RANKS_DIR
    for path in folder.glob("rank-*.json") if folder.is_dir() else []:
        path.unlink(missing_ok=True)
