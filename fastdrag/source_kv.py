"""The source branch's keys and values of stage 4, kept so that a repeated edit denoises one branch.

Denoising runs `[source, edited]` as a batch of two only because the edited branch's swapped
self-attention layers read the source branch's keys and values. The source branch starts from the
inverted latent and never sees the edited one, so for a repeated edit of an image (the same inverted
latent, prompt, adapter and denoising settings) its keys and values at every swapped step are those
of the first edit. `SourceKV` records them during one batch-2 denoising and hands them back, step by
step, to a batch-1 denoising of the edited branch: the same attention, without the source branch's
forward (SD 1.5 at 512 px: 23.6 MB of fp16 keys and values a step, 0.83 GB for 35 steps).

The step is a device tensor, so the recording and the reading both run inside CUDA graphs: the
slots are allocated once per layout (outside any capture, on the stream that runs the denoising)
and stay at their addresses until `clear()`, whose `generation` count is part of the denoiser's
graph key, so no graph replays over freed slots.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Hashable, Optional, Tuple

import torch


class SourceKV:
    """Per swapped layer, one (steps, *key shape) slot each for keys and values, and the step now run."""

    def __init__(self):
        self.slots: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.layout: Optional[tuple] = None   # (pairs, latent shape, dtype, swapped steps, start layer) of the slots
        self.generation = 0                   # bumped whenever slots are freed
        self.valid_for: Optional[Hashable] = None  # the key of the complete recording the slots hold
        self.recording = False
        self.step: Optional[torch.Tensor] = None   # 0-dim long: the row the layers record into or read
        self._stream = None                   # the CUDA stream the slots are allocated on

    @property
    def nbytes(self) -> int:
        """Bytes the slots hold."""
        return sum(t.numel() * t.element_size() for pair in self.slots.values() for t in pair)

    def holds(self, key: Hashable) -> bool:
        """Whether a complete recording for `key` is kept."""
        return self.valid_for is not None and self.valid_for == key

    def begin(self, latents: torch.Tensor, steps: int, start_layer: int, recording: bool) -> None:
        """Before a denoising of `latents` whose last `steps` steps swap keys and values: record into the
        slots (freeing them first if they were laid out for another shape) or read a kept recording.
        Recording, `latents` holds (source, edited) pairs; reading, the edited rows alone."""
        pairs = latents.shape[0] // 2 if recording else latents.shape[0]
        layout = (pairs, tuple(latents.shape[1:]), latents.dtype, steps, start_layer)
        if recording:
            if layout != self.layout:
                self.clear()
                self.layout = layout
            self.valid_for = None
        elif layout != self.layout or self.valid_for is None:
            raise RuntimeError("no complete recording of the source branch's keys and values for this denoising")
        self.recording = recording
        if self.step is None or self.step.device != latents.device:
            self.step = torch.zeros((), dtype=torch.long, device=latents.device)
        self._stream = torch.cuda.current_stream(latents.device) if latents.is_cuda else None

    def set_step(self, index: int) -> None:
        """The swapped step that the next forward runs (a fill on the device: no host sync)."""
        self.step.fill_(index)

    def finish(self, key: Hashable) -> None:
        """The recording that `begin` started is complete: it now answers for `key`."""
        if self.recording:
            self.valid_for = key
        self.recording = False

    def forget(self) -> None:
        """The recording no longer answers for anything (the adapter or the inversion changed); the
        slots stay allocated for the next recording."""
        self.valid_for = None
        self.recording = False

    def clear(self) -> None:
        """Free the slots."""
        self.slots = {}
        self.layout = None
        self.valid_for = None
        self.recording = False
        self.generation += 1

    def record(self, name: str, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write layer `name`'s source keys and values into this step's row."""
        slots = self.slots.get(name)
        if slots is None:
            slots = self.slots[name] = (self._allocate(key), self._allocate(value))
        row = self.step.view(1)
        slots[0].index_copy_(0, row, key.unsqueeze(0))
        slots[1].index_copy_(0, row, value.unsqueeze(0))

    def read(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Layer `name`'s source keys and values at this step (copies: a graph reads them at one address)."""
        if name not in self.slots:
            raise RuntimeError(f"no keys and values were recorded for layer {name}")
        row = self.step.view(1)
        keys, values = self.slots[name]
        return keys.index_select(0, row)[0], values.index_select(0, row)[0]

    def _allocate(self, like: torch.Tensor) -> torch.Tensor:
        steps = self.layout[3]
        if like.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("SourceKV slots must be allocated before a CUDA graph capture (in its warm-up)")
        # on the denoising's stream even inside a graph's side-stream warm-up, so that the caching
        # allocator returns the memory to that stream when the slots are freed
        stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with stream:
            return like.new_empty((steps,) + tuple(like.shape))
