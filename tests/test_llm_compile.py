"""torch.compile for the LLM's decoder layers (pipelines/llm/compiled.py): the same run, compiled."""

import pytest
import torch

from pipelines import load_config
from pipelines.training import read_events
from tests.test_llm_pipeline import train_run


def test_a_compiled_run_trains_like_an_eager_one_and_still_generates(tmp_path, assets):
    # float32: under bf16 autocast (the default where the CPU has bf16) fused and unfused kernels round
    # differently, and six steps drift apart by about 1e-4.
    config = load_config(assets / "llm" / "config.yaml").changed(
        max_steps=6, sample_every=3, checkpoint_every=100, validation_fraction=0.2, eval_every=3, mixed_precision="no")
    runs = {}
    graphs = {}
    for compile_layers in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        run_dir = tmp_path / f"compiled-{compile_layers}"
        assert train_run(config.changed(torch_compile=compile_layers), run_dir) == "completed"
        runs[compile_layers] = read_events(run_dir)[0]
        graphs[compile_layers] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # None eager; compiled, the one-line check that compiling works here, and the layers' graphs beside it.
    assert graphs[False] == 0 and graphs[True] >= 2, graphs
    eager, compiled = ([e["loss"] for e in events if e["type"] == "step"] for events in runs.values())
    assert len(compiled) == 6 and compiled == pytest.approx(eager, rel=1e-4)
    evals = [[e["eval_loss"] for e in events if e["type"] == "eval"] for events in runs.values()]
    assert evals[1] and evals[1] == pytest.approx(evals[0], rel=1e-4)
    samples = [[e["output"] for e in events if e["type"] == "sample"] for events in runs.values()]
    assert samples[1] and samples[1] == samples[0]
