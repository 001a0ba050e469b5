"""What all three pipelines share: the training loop, its events, checkpoints, resume and stop.

A pipeline describes its work as a `TrainingTask` (the model, how to cut an epoch into batches, how to
compute a batch's loss, how to evaluate, sample and save the adapter) and hands it to `run_training`.
The loop owns everything else, so stop, resume, NaN handling and progress behave the same in every tab.

Checkpoints are folders `checkpoints/step-N/` of safetensors and JSON (never pickles), written to a
temporary folder and renamed into place, so a process killed mid-save leaves the previous one intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipelines import distributed
from pipelines.config import RunConfig
# (re-exported: the pipelines import these from here with the loop)
from pipelines.events import (STOP_FILE, Events, TrainingFailure, checkpoint_dirs, read_events,  # noqa: F401
                              stop_requested)
from pipelines.threads import ThreadShare


def require_data(report, examples: list, what: str, log: Callable[[str], None]) -> None:
    """Log each problem the data check (a DataReport) found (those rows are skipped, warnings aside); fail when
    nothing is usable, for training or in the validation data given."""
    problems = report.problems
    for problem in problems:
        log(f"{'Note' if problem.kept else 'Skipped'}: {problem}")
    if not examples:
        first = problems[0] if problems else f"no {what}s"
        raise TrainingFailure(f"The training data has no usable {what} ({first}).", "Fix the data and start again.")
    if report.validation_unusable:
        raise TrainingFailure(f"The validation data has no usable {what}.",
                              "Fix it, or remove it to hold out a share of the training data instead.")


# ---- checkpoints -----------------------------------------------------------------------------

def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def adapter_dir(run_dir: str | Path, checkpoint: str | None = None, marker: str = "adapter_config.json") -> Path:
    """Where a run's adapter is: a named checkpoint's ("step-40"), else the final one, else (while the run
    is still training) the latest checkpoint's. `marker` is the file an adapter folder must hold."""
    run_dir = Path(run_dir)
    if checkpoint:
        folder = run_dir / "checkpoints" / checkpoint / "adapter"
    elif (run_dir / "adapter" / marker).exists():
        folder = run_dir / "adapter"
    else:
        latest = latest_checkpoint(run_dir)
        folder = latest / "adapter" if latest else run_dir / "adapter"
    if (folder / marker).exists():
        return folder
    saved = [p.name for p in checkpoint_dirs(run_dir) if (p / "adapter" / marker).exists()]
    saved += ["final"] if (run_dir / "adapter" / marker).exists() else []
    if checkpoint:  # (one pruned by keep_checkpoints, or mistyped)
        raise TrainingFailure(f"This run has no checkpoint {checkpoint}; it has: {', '.join(saved) or 'none yet'}.",
                              "Choose one of those.")
    raise TrainingFailure("This run has no adapter yet: it saves one at each checkpoint and when it ends.",
                          "Wait for its first checkpoint.")


def _optimizer_to_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as safetensors tensors plus JSON."""
    tensors, plain = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["plain"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    return tensors, plain


def _restore_rng(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- the loop --------------------------------------------------------------------------------

@dataclass
class TrainingTask:
    """What a pipeline hands the loop.

    batches_for_epoch(epoch) must return the same batches in the same order for the same epoch, so a
    resumed run sees exactly the data the uninterrupted one would have.
    loss_on(batch) returns the mean loss and how many units it covered (tokens, images, clips).
    """

    model: torch.nn.Module
    batches_for_epoch: Callable[[int], list]
    loss_on: Callable[[Any], tuple[torch.Tensor, int]]
    save_adapter: Callable[[Path], None]
    unit: str = "tokens"
    evaluate: Callable[[], dict[str, float]] | None = None
    make_samples: Callable[[], list[dict]] | None = None
    evaluate_at_start: bool = False
    extra_state: dict = field(default_factory=dict)  # written to state.json with each checkpoint
    # (module, weight) pairs where the module's forward reads a weight of another module directly (a tied
    # output projection): DeepSpeed ZeRO-3 must gather that weight for the module's forward too.
    borrowed_weights: list = field(default_factory=list)
    fp16: bool = False  # the frozen model computes in fp16 (a GPU without bf16): the loop scales the loss


class LossScale:
    """Dynamic loss scaling for runs that compute in fp16, as torch's GradScaler does it, folded into the
    loop's one read of the gradients' norm. fp16 holds nothing below 6e-8, and gradients flowing back
    through fp16 layers (from a loss averaged over thousands of latent values or tokens) fall there and
    become zero; multiplied by 2**16 first, they survive. A step whose scaled gradients overflow is skipped
    and the scale halved; after 2000 good steps in a row it doubles. Off, the scale is 1 and never moves."""

    GROWTH_INTERVAL = 2000

    def __init__(self, enabled: bool):
        self.enabled, self.scale, self.good_steps = enabled, 2.0 ** 16 if enabled else 1.0, 0

    def after_step(self, overflowed: bool) -> None:
        if not self.enabled:
            return
        if overflowed:
            self.scale, self.good_steps = self.scale / 2, 0
        elif self.good_steps + 1 == self.GROWTH_INTERVAL:
            self.scale, self.good_steps = self.scale * 2, 0
        else:
            self.good_steps += 1

    def state(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def restore(self, state: dict | None) -> None:
        if self.enabled and state:
            self.scale, self.good_steps = state["scale"], state["good_steps"]


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def make_scheduler(optimizer, config: RunConfig, total_steps: int):
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if config.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def count_steps(config: RunConfig, batches_per_epoch: int, world: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps). A step takes accumulation x world batches."""
    per_epoch = max(1, math.ceil(batches_per_epoch / (config.gradient_accumulation * world)))
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    return per_epoch, total


def seed_batch(seed: int, step: int, index: int) -> None:
    """Seed torch for the index-th batch of a step's global chunk: the batch's dropout and noise are then
    the same whichever process computes it, so 1 and N processes follow the same curve."""
    torch.manual_seed((seed * 1_000_003 + step) * 65_537 + index)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_training(task: TrainingTask, config: RunConfig, run_dir: str | Path, events: Events,
                 should_stop: Callable[[], bool], resume: bool = False,
                 log: Callable[[str], None] = print) -> str:
    """Train until done or stopped. Returns "completed" or "stopped"; raises TrainingFailure.

    In a multi-process run (pipelines.distributed) every process calls this; only rank 0 writes."""
    threads = torch.get_num_threads()
    try:
        return _train_until_done(task, config, run_dir, events, should_stop, resume, log)
    finally:
        torch.set_num_threads(threads)  # the loop may have trained on fewer (pipelines.threads)


def make_optimizer(params: list[torch.Tensor], config: RunConfig, plain: bool = False) -> torch.optim.AdamW:
    """AdamW over the adapter. torch's fused kernel updates every tensor in one pass instead of a dozen small
    operations per tensor (3-5% of tiny-sd's CPU step) and gives the same update to float32 rounding.
    DeepSpeed, which takes the optimizer over and steps it on its own flat partitions, gets the ordinary one
    (plain=True)."""
    fused = not plain and all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                             fused=True if fused else None)


def _train_until_done(task: TrainingTask, config: RunConfig, run_dir: str | Path, events: Events,
                      should_stop: Callable[[], bool], resume: bool, log: Callable[[str], None]) -> str:
    run_dir = Path(run_dir)
    here = distributed.place()
    model = task.model
    params = trainable_parameters(model)
    if not params:
        raise TrainingFailure("The model has no trainable parameters.", "Check the LoRA target modules.")
    device = next(iter(params.values())).device
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        log("No checkpoint found: starting from the beginning.")
    if checkpoint is not None:  # the weights before any strategy takes them over (DeepSpeed copies them)
        weights = load_file(checkpoint / "trainable.safetensors")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name].to(p.device, p.dtype))
    if here.distributed and config.strategy == "fsdp":
        log(f"FSDP: {distributed.shard_frozen_weights(model, device, config)} blocks of the base model are split "
            f"between {here.world} processes.")
    deepspeed = here.distributed and config.strategy.startswith("zero")
    optimizer = make_optimizer(list(params.values()), config, plain=deepspeed)
    zero = distributed.ZeroSteps(model, optimizer, params, config, task.borrowed_weights) if deepspeed else None
    loss_scale = LossScale(task.fp16 and not zero)  # (ZeroSteps owns its gradients' partitions: not scaled)
    if loss_scale.enabled:
        log("Computing in fp16: the loss is scaled up before backward, so small gradients do not become zero.")
    whole = zero.whole if zero else contextlib.nullcontext

    def epoch_batches(epoch: int) -> list:
        batches = task.batches_for_epoch(epoch)
        # Every process must get the same number of batches per step: drop the last few (< world).
        return batches[:len(batches) - len(batches) % here.world]

    epoch0 = epoch_batches(0)
    if not epoch0:
        raise TrainingFailure("The training data has no usable example.", "Fix the problems the data check lists.")
    per_epoch, total_steps = count_steps(config, len(epoch0), here.world)
    rank_status = distributed.RankStatus(run_dir, here, device) if here.distributed else None
    scheduler = make_scheduler(optimizer, config, total_steps)

    step, epoch, chunk_start, units_done, elapsed_before = 0, 0, 0, 0, 0.0
    if checkpoint is not None:
        state = json.loads((checkpoint / "state.json").read_text())
        saved = _optimizer_from_files(load_file(checkpoint / "optimizer.safetensors"), state["optimizer"])
        if zero:
            zero.load_optimizer_state(saved)
        else:
            optimizer.load_state_dict(saved)
        scheduler.load_state_dict(state["scheduler"])
        _restore_rng(load_file(checkpoint / "rng.safetensors"), state["rng"])
        step, epoch, chunk_start = state["step"], state["epoch"], state["next_chunk"]
        units_done, elapsed_before = state.get("units_done", 0), state.get("elapsed_s", 0.0)
        loss_scale.restore(state.get("loss_scale"))
        events.emit("resumed", step=step, checkpoint=checkpoint.name)
        log(f"Resumed from {checkpoint.name}: step {step} of {total_steps}.")
    else:
        seed_everything(config.seed)

    def save_checkpoint() -> Path:
        final = run_dir / "checkpoints" / f"step-{step}"
        if not (here.main or zero):  # (under DeepSpeed every rank takes part in gathering the state)
            return final
        weights = zero.weights() if zero else {n: p.detach().cpu().contiguous() for n, p in params.items()}
        opt_tensors, opt_meta = _optimizer_to_files(zero.optimizer_state(step) if zero else optimizer.state_dict())
        with whole():
            if here.main and not final.exists():
                write_checkpoint(final, weights, opt_tensors, opt_meta)
        return final

    def write_checkpoint(final: Path, weights: dict, opt_tensors: dict, opt_meta: dict) -> None:
        tmp = run_dir / "checkpoints" / f".tmp-step-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            save_file(weights, tmp / "trainable.safetensors")
            save_file(opt_tensors, tmp / "optimizer.safetensors")
            rng_tensors, rng_plain = _rng_state()
            save_file(rng_tensors, tmp / "rng.safetensors")
            task.save_adapter(tmp / "adapter")
            state = {"step": step, "epoch": epoch, "next_chunk": chunk_start, "total_steps": total_steps,
                     "units_done": units_done, "elapsed_s": elapsed, "optimizer": opt_meta,
                     "scheduler": scheduler.state_dict(), "rng": rng_plain, "loss_scale": loss_scale.state(),
                     **task.extra_state}
            # state.json last: a folder without it is incomplete and ignored by latest_checkpoint().
            (tmp / "state.json").write_text(json.dumps(state))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint (full disk, kill) leaves nothing
            raise
        for old in checkpoint_dirs(run_dir)[:-config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        events.emit("checkpoint", step=step, path=str(final.relative_to(run_dir)))

    def evaluate() -> None:
        if task.evaluate is None or not (here.main or config.splits_weights):
            return
        model.eval()
        with torch.no_grad():
            metrics = task.evaluate()
        model.train()
        if metrics:  # (a rank other than 0 writes no events)
            events.emit("eval", step=step, **metrics)

    def samples() -> None:
        if task.make_samples is None or not (here.main or config.splits_weights):
            return
        model.eval()
        with torch.no_grad():
            made = task.make_samples()
        model.train()
        for sample in made:
            events.emit("sample", step=step, **sample)

    global_batch = config.batch_size * config.gradient_accumulation * here.world
    events.emit("started", total_steps=total_steps, steps_per_epoch=per_epoch, unit=task.unit,
                resumed_from=step, trainable_parameters=sum(p.numel() for p in params.values()),
                processes=here.world, global_batch=global_batch)
    if rank_status:
        rank_status.update(force=True, state="training", step=step,
                           weights_mb=round(distributed.held_weight_bytes(model) / 2**20, 1))
    if task.evaluate_at_start and step == 0:
        evaluate()
    model.train()
    share = ThreadShare(log) if device.type == "cpu" else None
    started = time.perf_counter()
    elapsed = elapsed_before
    window: list[tuple[float, int]] = []  # (seconds, units) of recent steps, for the throughput figure

    while step < total_steps:
        batches = epoch0 if epoch == 0 else epoch_batches(epoch)
        size = config.gradient_accumulation * here.world
        chunks = [batches[i:i + size] for i in range(0, len(batches), size)]
        while chunk_start < len(chunks) and step < total_steps:
            t0 = time.perf_counter()
            chunk = chunks[chunk_start]
            mine = range(here.rank, len(chunk), here.world)  # this process's share of the global chunk
            step_loss, units = None, 0
            for index in mine:
                seed_batch(config.seed, step, index)
                loss, n = task.loss_on(chunk[index])
                if zero:
                    zero.backward(loss / len(mine), last=index == mine[-1])
                else:
                    (loss * loss_scale.scale / len(mine)).backward()
                step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
                units += n
            # The step's one wait for the device (reading a GPU value stalls the queue of kernels, so none is
            # read per batch): the loss and the gradients' norm together. A NaN/inf loss, or a finite loss whose
            # gradients overflowed, only spoiled gradients: the weights are untouched until step().
            held = [p.grad for p in params.values() if p.grad is not None]  # (DeepSpeed keeps its own)
            norm = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).to(step_loss.device) for g in held]))
                    if held else step_loss.new_zeros(()))
            loss_sum, grad_norm = torch.stack([step_loss.float(), norm.float()]).tolist()
            stop, batches_done = False, len(mine)
            if here.distributed:  # rank 0's Stop travels with the gradients: every rank stops at the same step
                # (DeepSpeed averages its gradients itself: only the figures travel then.)
                grads = [] if zero else [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
                loss_sum, units, batches_done, stop, grad_norm = distributed.all_reduce_step(
                    grads, [loss_sum, units, len(mine), here.main and should_stop(), grad_norm], here.world, device)
                units = int(units)
                for p, g in zip(params.values(), grads):
                    p.grad = g
            # (a NaN or inf on any process makes the summed figure so on all of them)
            advice = "Lower the learning rate (try half) or check the data for empty examples."
            if not math.isfinite(loss_sum):
                raise TrainingFailure(f"The loss became {loss_sum} at step {step + 1}.", advice)
            # Scaled fp16 gradients that overflowed: skip this step at a lower scale (every process sees the
            # same summed norm, so all skip together). Unscaled, an overflow is a real divergence.
            overflowed = not math.isfinite(grad_norm)
            if overflowed and loss_scale.scale == 1:
                raise TrainingFailure(f"The gradients became {grad_norm} at step {step + 1} (the loss was "
                                      f"{loss_sum / batches_done:.4g}).", advice)
            lr = scheduler.get_last_lr()[0]
            if zero:
                zero.step()
            elif overflowed:
                log(f"Step {step + 1}: the fp16 gradients overflowed at loss scale {loss_scale.scale:g}; "
                    "the step is skipped and the scale halved.")
                optimizer.zero_grad(set_to_none=True)
            else:
                if loss_scale.scale != 1:  # (not `held`: the all-reduce may have given a None grad a tensor)
                    scaled = [p.grad for p in params.values() if p.grad is not None]
                    torch._foreach_mul_(scaled, 1 / loss_scale.scale)
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params.values(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_scale.after_step(overflowed)
            if not overflowed:  # (a skipped step leaves the schedule where it was, as it leaves the weights)
                scheduler.step()
            step += 1
            chunk_start += 1
            units_done += units
            seconds = time.perf_counter() - t0
            elapsed = elapsed_before + (time.perf_counter() - started)
            window = (window + [(seconds, units)])[-20:]
            rate = sum(u for _, u in window) / max(1e-9, sum(s for s, _ in window))
            step_time = sum(s for s, _ in window) / len(window)
            events.emit("step", step=step, total_steps=total_steps, epoch=epoch + chunk_start / len(chunks),
                        loss=loss_sum / batches_done, lr=lr, units=units, units_per_s=rate,
                        eta_s=step_time * (total_steps - step), elapsed_s=elapsed)
            if rank_status:
                rank_status.update(step=step)
            if share:
                share.check()
            last = step == total_steps
            if config.eval_every and step % config.eval_every == 0 and not last:
                evaluate()
            if config.sample_every and step % config.sample_every == 0 and not last:
                samples()
            if not here.distributed:
                stop = should_stop()
            if stop and not last:
                save_checkpoint()
                log(f"Stopped at step {step}; checkpoint saved.")
                if rank_status:
                    rank_status.update(force=True, state="stopped")
                return "stopped"
            if step % config.checkpoint_every == 0 and not last:
                save_checkpoint()
        if chunk_start >= len(chunks):
            epoch, chunk_start = epoch + 1, 0

    evaluate()
    samples()
    save_checkpoint()
    with whole():
        if here.main:
            task.save_adapter(run_dir / "adapter")
    if rank_status:
        rank_status.update(force=True, state="completed", step=step)
    log(f"Finished {total_steps} steps in {elapsed:.1f} s.")
    return "completed"


def iterate_in_batches(items: list, batch_size: int) -> Iterator[list]:
    for i in range(0, len(items), batch_size):
        yield items[i:i + batch_size]


def shuffled(items: list, seed: int, epoch: int) -> list:
    """The epoch's order, a function of (seed, epoch) alone: what makes resume exact."""
    order = list(range(len(items)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [items[i] for i in order]


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively (fast) here: a GPU with bf16, or a CPU with bf16 instructions
    (AVX512-BF16 or AMX). Elsewhere bf16 is emulated and slower than float32: oneDNN's own check
    (torch.ops.mkldnn._is_mkldnn_bf16_supported) says yes to any AVX512 CPU, Skylake to Ice Lake included,
    where it is emulated. (studio/hardware.py reads the same two flags without torch.) On a GPU: Ampere or
    newer; torch's own check also says yes to older ones (a T4, a V100), which only emulate it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)  # (private in torch, hence getattr)


def pick_device(choice: str) -> torch.device:
    """The device to train on; in a multi-process GPU run, this process's own GPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainingFailure("This run asks for a GPU (device: cuda) but none is available.",
                              "Set device to auto or cpu.")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", distributed.place().local_rank)
