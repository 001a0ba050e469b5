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

Strategies zero2 and zero3 hand the model and optimizer to DeepSpeed (`ZeroSteps`), configured by a JSON
preset in assets/scale/ (or the run's own file): ZeRO-2 splits gradients and optimizer state, ZeRO-3 the
weights too. DeepSpeed then averages the gradients, clips and steps; checkpoints gather the whole adapter
and optimizer state into the same files as the other strategies, so a run resumes under any of them.

Imports torch only where it needs it: the UI reads rank states through this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

RANKS_DIR = "ranks"
PRESETS = Path(__file__).resolve().parents[1] / "assets" / "scale"  # each strategy's settings, <strategy>.json


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


def all_reduce_step(gradients: list[torch.Tensor], stats: list[float], world: int,
                    device: torch.device) -> list[float]:
    """Average `gradients` in place over all processes and sum `stats`; returns the summed stats."""
    import torch
    dtype = gradients[0].dtype if gradients else torch.float32
    flat = torch.cat([g.reshape(-1) for g in gradients] + [torch.tensor(stats, dtype=dtype, device=device)])
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


def shard_frozen_weights(model: torch.nn.Module, device: torch.device, config) -> int:
    """FSDP (torch's fully_shard) over the model's repeated blocks: each process keeps 1/world of their frozen
    weights and gathers a block's whole weights only for its forward and backward. The trainable adapter
    weights are left out of FSDP, whole on every process. Returns how many blocks were split."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    reshard = bool(strategy_settings(config).get("reshard_after_forward", True))
    mesh = init_device_mesh(device.type, (place().world,))
    blocks = repeated_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard,
                    ignored_params={p for p in block.parameters() if p.requires_grad})
    return len(blocks)


def strategy_settings(config) -> dict:
    """The run's strategy_config file, else the strategy's shipped preset (assets/scale/<strategy>.json)."""
    path = Path(config.strategy_config) if config.strategy_config else PRESETS / f"{config.strategy}.json"
    return json.loads(path.read_text())


class ZeroSteps:
    """DeepSpeed ZeRO driving the loop's backward passes and optimizer steps (strategies zero2, zero3)."""

    ADAM_STATE = ("exp_avg", "exp_avg_sq")  # AdamW's tensors per weight (besides its step count)

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, params: dict, config,
                 borrowed_weights: list = ()) -> None:
        try:
            import deepspeed
        except ImportError:
            from pipelines.training import TrainingFailure
            raise TrainingFailure(f"Strategy {config.strategy} needs the deepspeed package, which is not installed.",
                                  "Run `.venv/bin/pip install deepspeed`, or choose ddp or fsdp.") from None
        settings = deepspeed_settings(config)
        self.deepspeed, self.params, self.stage = deepspeed, params, settings["zero_optimization"]["stage"]
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=settings)
        for module, weight in borrowed_weights if self.stage == 3 else ():
            deepspeed.zero.register_external_parameter(module, weight)
        # The AdamW that DeepSpeed runs on this process's flat slices of the weights.
        self.inner = self.engine.optimizer.optimizer

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """One batch's share of the step's loss; `last`: DeepSpeed reduces the gradients after this one."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        self.engine.step()  # clips (gradient_clipping), steps and zeroes the gradients

    @contextlib.contextmanager
    def whole(self) -> Iterator[None]:
        """The adapter's weights whole on every process while inside (ZeRO-3 splits them). All ranks enter."""
        if self.stage == 3:
            with self.deepspeed.zero.GatheredParameters(list(self.params.values())):
                yield
        else:
            yield

    def weights(self) -> dict[str, torch.Tensor]:
        """Every adapter weight, whole (all ranks call this)."""
        from deepspeed.utils import safe_get_full_fp32_param
        return {name: safe_get_full_fp32_param(p).detach().cpu().contiguous() for name, p in self.params.items()}

    def optimizer_state(self, step: int) -> dict:
        """The optimizer state in torch AdamW's own layout (param index -> state), gathered whole."""
        from deepspeed.utils import safe_get_full_optimizer_state
        import torch
        if step == 0:
            return {"state": {}, "param_groups": self._groups()}
        state = {i: {"step": torch.tensor(float(step)),
                     **{key: safe_get_full_optimizer_state(p, key).cpu() for key in self.ADAM_STATE}}
                 for i, p in enumerate(self.params.values())}
        return {"state": state, "param_groups": self._groups()}

    def load_optimizer_state(self, saved: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state
        import torch
        for group, saved_group in zip(self.inner.param_groups, saved["param_groups"]):
            group["lr"] = saved_group["lr"]  # the scheduler sets it only at its next step
        if not saved["state"]:
            return
        step = next(iter(saved["state"].values()))["step"]
        # AdamW creates its state at its first step: make it now for each flat slice of weights DeepSpeed steps
        # (stage 3 and stage 2 name them differently), then fill in each weight's part.
        zero_optimizer = self.engine.optimizer
        flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or \
            zero_optimizer.single_partition_of_fp32_groups
        for flat in flats:
            self.inner.state[flat] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(flat),
                                      "exp_avg_sq": torch.zeros_like(flat)}
        for i, p in enumerate(self.params.values()):
            for key in self.ADAM_STATE:
                safe_set_full_optimizer_state(p, saved["state"][i][key], key)

    def _groups(self) -> list[dict]:
        return [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(self.params)))}
                for g in self.inner.param_groups[:1]]


def deepspeed_settings(config) -> dict:
    """The strategy's settings with the run's batch, accumulation and clipping written over them: those are set
    in the studio, whatever the file says."""
    settings = strategy_settings(config)
    settings.update(train_micro_batch_size_per_gpu=config.batch_size,
                    gradient_accumulation_steps=config.gradient_accumulation,
                    gradient_clipping=config.max_grad_norm, steps_per_print=2**31 - 1)
    settings.setdefault("zero_optimization", {})["stage"] = 3 if config.strategy == "zero3" else 2
    return settings


def held_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of model weights this process holds (only its own part, under fsdp and zero3)."""
    from torch.distributed.tensor import DTensor

    def held(p):
        if isinstance(p, DTensor):
            return p.to_local().nbytes
        return p.ds_tensor.nbytes if hasattr(p, "ds_tensor") else p.nbytes  # ZeRO-3 keeps its part in ds_tensor

    return sum(held(p) for p in model.parameters())


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
