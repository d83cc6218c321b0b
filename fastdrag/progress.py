"""How the looped stages report their steps: a tqdm bar, and a caller's callback that may stop the edit.

A server shows its users how far an edit is and drops an edit whose client went away. It passes
`on_step(stage, done, total)` to `DragEditor.edit`; the stages with a loop ("lora", "inversion",
"drag", "denoise"; an export's "export" and "engines") call it with 0 before their first step and with
the steps done after each one ("lora" and "export" also with 0 while they wait for another process's
training or export of the same thing).
An exception the callback raises (`EditCancelled`, or the server's own) stops the edit there and
leaves the editor as a fresh one would be for the next edit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

from tqdm.auto import tqdm

StepCallback = Callable[[str, int, int], None]  # (stage, steps done, steps at most)


class EditCancelled(Exception):
    """Raised by an `on_step` callback to stop an edit (a client went away, a deadline passed)."""


@dataclass(frozen=True)
class Progress:
    """A stage's reporting: a tqdm bar unless `bar` is false, and `on_step` if given.

    Steps are counted as the host issues them. On a GPU the device may still be behind, and the
    callback runs between launches: it must not wait on the device, or the stage loses its overlap.
    A drag that arrives early stops before its total.
    """

    bar: bool = True
    on_step: Optional[StepCallback] = None

    def steps(self, stage: str, total: int) -> Iterator[int]:
        """0 .. total-1, reporting each step after the loop's body ran it."""
        if self.on_step is not None:
            self.on_step(stage, 0, total)
        for index in tqdm(range(total), desc=stage, disable=not self.bar, leave=False):
            yield index
            if self.on_step is not None:
                self.on_step(stage, index + 1, total)


def as_progress(progress: Union[bool, Progress]) -> Progress:
    """`progress` as a `Progress`: True or False say whether to show the bar, as they always did."""
    return progress if isinstance(progress, Progress) else Progress(bar=bool(progress))
