"""The decoder's cross-attention keys and values, kept per clip while the encoder is frozen.

Each decoder layer projects the encoder's 1,500 output positions to keys and values at every step, for a
transcript of a few dozen tokens: about a third of a decoder step at Whisper base's and small's sizes
(measured with LoRA on the attention, 8 clips, 1 thread: 0.79 of 2.48 s, 3.7 of 9.3 s). With the encoder
frozen its outputs never change, so neither does the frozen projection's share, `W x + b`: it is computed
at a clip's first step and kept. LoRA's own share, `B A x`, is small and computed every step, as it trains.

The cache sits under LoRA: each cross-attention key and value layer's frozen base gets a forward that
serves the batch's clips from the cache. It only answers for a batch whose clips it was told
(`CrossAttentionCache.clips`); anything else (decoding, Try it) runs the plain projection.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class CrossAttentionCache:
    def __init__(self, decoder: torch.nn.Module, budget_bytes: int):
        self.room = budget_bytes  # what is left of the budget; clips that do not fit are projected each step
        self.rows: dict[tuple[int, int], torch.Tensor] = {}  # (layer number, clip) -> [positions, width]
        self.clips: list[int] | None = None
        layers = [layer for block in decoder.blocks for layer in (block.cross_attn.key, block.cross_attn.value)]
        for number, layer in enumerate(layers):
            base = getattr(layer, "base_layer", layer)  # (peft's LoRA layer wraps the frozen one)
            base.forward = self._serving(number, base.forward)

    @contextlib.contextmanager
    def serving(self, clips: list[int]) -> Iterator[None]:
        """Within this, a batch of exactly these clips (in this order) is served from the cache."""
        self.clips = clips
        try:
            yield
        finally:
            self.clips = None

    def _serving(self, number: int, project):
        def forward(x: torch.Tensor) -> torch.Tensor:
            clips = self.clips
            if clips is None or len(clips) != len(x) or torch.is_grad_enabled() and x.requires_grad:
                return project(x)
            rows = [self.rows.get((number, clip)) for clip in clips]
            missing = [i for i, row in enumerate(rows) if row is None]
            if missing:
                computed = project(x[missing])
                for i, row in zip(missing, computed):
                    rows[i] = row
                    if self.room >= row.nbytes:
                        self.rows[(number, clips[i])] = row.clone()  # (not a view keeping the batch alive)
                        self.room -= row.nbytes
            return torch.stack(rows)
        return forward
