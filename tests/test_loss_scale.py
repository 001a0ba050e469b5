"""The shared loop's loss scaling for runs that compute in fp16 (a GPU without bf16: T4, V100), shown on the
CPU with the same fp16 arithmetic: small gradients survive it, and overflowing steps are skipped, not fatal."""

import json

import pytest
import torch
import torch.nn.functional as F

from pipelines.config import RunConfig
from pipelines.training import Events, TrainingTask, latest_checkpoint, read_events, run_training


class HalfNetwork(torch.nn.Module):
    """Frozen fp16 layers around a float32 adapter, as a LoRA run on a GPU without bf16 holds them. The last
    layer's weights, `out_scale` times a normal draw, shrink (or grow) the gradients flowing back through it
    the way the many layers of a real network do."""

    def __init__(self, out_scale: float):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("first", torch.randn(32, 32, generator=generator).half())
        self.register_buffer("last", (torch.randn(32, 32, generator=generator) * out_scale).half())
        self.adapter = torch.nn.Parameter(torch.zeros(32, 32))

    def forward(self, x: torch.Tensor, adapter: torch.Tensor | None = None) -> torch.Tensor:
        adapter = self.adapter if adapter is None else adapter
        hidden = x.half() @ self.first + (x @ adapter).half()
        return (hidden @ self.last).float()


def train(tmp_path, out_scale: float, fp16: bool, steps: int = 30) -> tuple[list[float], list[str], dict]:
    """Train the adapter towards a target the network reaches with some other adapter; the step losses,
    the log and the last checkpoint's state."""
    model = HalfNetwork(out_scale)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=generator)
    with torch.no_grad():
        target = model(x, adapter=torch.randn(32, 32, generator=generator) * 0.1)

    def loss_on(batch):
        return F.mse_loss(model(x), target), len(x)

    task = TrainingTask(model=model, batches_for_epoch=lambda epoch: [0], loss_on=loss_on,
                        save_adapter=lambda folder: folder.mkdir(parents=True), unit="rows", fp16=fp16)
    config = RunConfig(max_steps=steps, learning_rate=1e-2, scheduler="constant", max_grad_norm=0.0,
                       checkpoint_every=steps)
    run_dir = tmp_path / f"run-{out_scale}-{fp16}"
    run_dir.mkdir()
    events, log = Events(run_dir), []
    assert run_training(task, config, run_dir, events, lambda: False, log=log.append) == "completed"
    events.close()
    losses = [e["loss"] for e in read_events(run_dir)[0] if e["type"] == "step"]
    return losses, log, json.loads((latest_checkpoint(run_dir) / "state.json").read_text())


def test_gradients_too_small_for_fp16_still_train_with_the_loss_scaled(tmp_path):
    # Small last-layer weights: the gradients reaching the adapter are about 1e-9, below fp16's smallest
    # number (6e-8), so unscaled they are all exactly zero and nothing is learned.
    plain, _, _ = train(tmp_path, out_scale=5e-4, fp16=False)
    assert plain[-1] == plain[0]
    scaled, log, state = train(tmp_path, out_scale=5e-4, fp16=True)
    assert any("the loss is scaled up" in line for line in log)
    assert scaled[0] == pytest.approx(plain[0]) and scaled[-1] < 0.1 * scaled[0]
    assert state["loss_scale"]["scale"] == 2.0 ** 16  # (nothing overflowed)


def test_steps_whose_scaled_gradients_overflow_are_skipped_and_the_scale_lowered(tmp_path):
    # Large last-layer weights: the gradients are of order 1, so scaled by 2**16 they pass fp16's largest
    # number (65504) and become inf. Unscaled that would end the run; here the step is skipped at half the
    # scale until they fit, and the run trains as the unscaled one does.
    unscaled, _, _ = train(tmp_path, out_scale=16.0, fp16=False)
    scaled, log, state = train(tmp_path, out_scale=16.0, fp16=True)
    skipped = [line for line in log if "the step is skipped and the scale halved" in line]
    assert skipped and skipped[0].startswith("Step 1: the fp16 gradients overflowed at loss scale 65536")
    assert state["loss_scale"]["scale"] == 2.0 ** 16 / 2 ** len(skipped)
    assert scaled[-1] < 0.1 * scaled[0] and unscaled[-1] < 0.1 * unscaled[0]
    # Each skipped step leaves the adapter as it was: the scaled run is that many steps behind.
    behind = len(skipped)
    assert scaled[behind] == pytest.approx(unscaled[0])
    assert scaled[-1] == pytest.approx(unscaled[-1 - behind], rel=0.05)
