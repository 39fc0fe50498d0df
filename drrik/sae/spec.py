"""What one dictionary of a run reads and what it reconstructs.

An SAE reads a hook and reconstructs the same hook; a transcoder reads one hook and
reconstructs another. The store serves the union of every spec's hooks from one forward pass,
the training step takes its input from ``reads`` and its target from ``writes``, the
evaluator splices the reconstruction into ``writes`` and the saved layout names both.
"""

from __future__ import annotations

from dataclasses import dataclass

from drrik.sae.config import SAEConfig


@dataclass(frozen=True)
class DictionarySpec:
    """One dictionary: its name in the run, the hooks it reads and writes, its config."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    sae: SAEConfig
    setting: str = ""
    """Its sweep setting (``k=8__skip_connection=true``), empty without a sweep: the
    dictionaries of one setting are the ones spliced in together (``--eval-together``)."""

    @property
    def input_hook(self) -> str:
        """The hook the encoder reads."""
        return self.reads[0]

    @property
    def target_hook(self) -> str:
        """The hook the decoder reconstructs."""
        return self.writes[0]

    @property
    def hooks(self) -> tuple[str, ...]:
        """Every hook this dictionary needs from the store, each once."""
        return tuple(dict.fromkeys(self.reads + self.writes))

    @property
    def same_hook(self) -> bool:
        """Whether it reconstructs what it reads (an SAE)."""
        return self.reads == self.writes
