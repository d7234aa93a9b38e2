"""Reuse the output of a frozen prefix of transformer blocks instead of recomputing it every step.

When every block below block k is frozen and unchanged between a device's participations (FibecFed's
suffix GAL with the second sparse reading: the backbone is frozen and the non-GAL LoRA is never
trained), the hidden states entering block k are a fixed function of the input. They are computed
once per sample in eval mode (no dropout) and replayed: the prefix blocks then return the stored
hidden states instead of running, so a training step only runs the blocks from k on, forward and
backward. The embeddings still run (a lookup) because the model builds its attention mask and
position inputs there; only the blocks are skipped.

Pure torch; works for any stack `transformer_blocks` finds whose blocks take the hidden states first
and return them (a tensor, or a tuple whose first element is the hidden states).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .blocks import transformer_blocks


class _PrefixDone(Exception):
    """Raised by the capture hook to stop a forward pass once the prefix has run."""


def prefix_fingerprint(tensors: dict[str, Tensor]) -> list[float]:
    """A cheap summary of the trainable tensors inside the prefix; it changes when any of them changes."""
    return [float(v.double().sum()) + 1e-3 * float(v.double().abs().sum()) for _, v in sorted(tensors.items())]


def _hidden_of(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def split_by_length(hidden: Tensor, attention_mask: Tensor) -> list[Tensor]:
    """Per-sample hidden states of a right-padded batch, trimmed to each sample's own length, on CPU."""
    lengths = attention_mask.sum(dim=1).tolist()
    return [hidden[i, :int(n)].detach().cpu() for i, n in enumerate(lengths)]


@contextlib.contextmanager
def capture_prefix_output(model: nn.Module, first_trained: int, *, stop: bool = False) -> Iterator[dict]:
    """Record the hidden states leaving block `first_trained - 1` of every forward pass in the block.

    Yields a dict whose "hidden" is the latest batch's output and "tuple" whether the block returns a
    tuple. With `stop`, the forward pass ends there (raising inside; `run_prefix` catches it).
    """
    if first_trained < 1:
        raise ValueError(f"a frozen prefix needs at least one block, got first_trained={first_trained}")
    seen: dict = {}

    def hook(_module, _args, output):
        seen["hidden"], seen["tuple"] = _hidden_of(output).detach(), isinstance(output, tuple)
        if stop:
            raise _PrefixDone

    handle = transformer_blocks(model)[first_trained - 1].register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def run_prefix(model: nn.Module, first_trained: int, inputs: dict[str, Tensor]) -> tuple[Tensor, bool]:
    """Hidden states entering block `first_trained` for one batch, computed in eval mode and stopping
    there, and whether the block returns a tuple."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with capture_prefix_output(model, first_trained, stop=True) as seen:
            try:
                model(**inputs)
            except _PrefixDone:
                pass
    finally:
        for m, training in modes:
            m.training = training
    if "hidden" not in seen:
        raise RuntimeError(f"block {first_trained - 1} did not run in the model's forward pass")
    return seen["hidden"], seen["tuple"]


def pad_batch(cache: list[Tensor], rows: Tensor, device: torch.device) -> Tensor:
    """The cached hidden states of `rows` as one right-padded batch (B, longest, H) on `device`.

    Its length is the batch's longest sample, the length `core.local.model_inputs` trims the batch to.
    Padded positions hold zeros; the attention mask hides them from every real position.
    """
    parts = [cache[int(i)] for i in rows]
    return nn.utils.rnn.pad_sequence(parts, batch_first=True).to(device, non_blocking=True)


@contextlib.contextmanager
def replay_prefix(model: nn.Module, first_trained: int, hidden: Callable[[], Tensor], *,
                  returns_tuple: bool = False) -> Iterator[None]:
    """Make blocks 0..first_trained-1 return `hidden()` (the current batch's cached states) without running.

    Only the last prefix block's output reaches block `first_trained`; the blocks before it are
    skipped the same way, so none of the prefix's compute happens. The blocks' parameters and names
    are untouched: only their instance `forward` is shadowed, and restored on exit.
    """
    blocks = transformer_blocks(model)[:first_trained]

    def skip(*_args, **_kwargs):
        h = hidden()
        return (h,) if returns_tuple else h

    for block in blocks:
        block.forward = skip
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


class FrozenPrefixCache:
    """One device's cached prefix outputs, kept in its state between participations.

    `state["prefix_cache"]` holds the block index it was computed for, the prefix fingerprint, whether
    the blocks return tuples, and one (length, hidden) tensor per sample. A different block index or
    fingerprint (the prefix was trained or re-selected) makes it stale, and it is recomputed.
    """

    def __init__(self, first_trained: int, fingerprint: list[float]):
        self.first_trained = first_trained
        self.fingerprint = fingerprint
        self.hidden: list[Optional[Tensor]] = []
        self.returns_tuple = False
        self._current: Optional[Tensor] = None

    @classmethod
    def from_state(cls, state: dict, first_trained: int, fingerprint: list[float], n: int) -> "FrozenPrefixCache":
        """The device's cache if it is still valid for this prefix and data size, else an empty one."""
        cache = cls(first_trained, fingerprint)
        kept = state.get("prefix_cache")
        if (kept and kept["first_trained"] == first_trained and kept["fingerprint"] == fingerprint
                and len(kept["hidden"]) == n):
            cache.hidden, cache.returns_tuple = list(kept["hidden"]), kept["tuple"]
        else:
            cache.hidden = [None] * n
        return cache

    def to_state(self) -> dict:
        return {"first_trained": self.first_trained, "fingerprint": self.fingerprint, "tuple": self.returns_tuple,
                "hidden": self.hidden}

    def missing(self) -> list[int]:
        return [i for i, h in enumerate(self.hidden) if h is None]

    def store(self, rows: Tensor, hidden: Tensor, attention_mask: Tensor, returns_tuple: bool) -> None:
        """Keep one batch's prefix output (rows in `rows` order, mask trimmed like the batch)."""
        for i, h in zip(rows.tolist(), split_by_length(hidden, attention_mask)):
            self.hidden[i] = h
        self.returns_tuple = returns_tuple

    def fill(self, model: nn.Module, batches: list[Tensor], make_inputs: Callable[[Tensor], dict]) -> int:
        """Compute the missing samples' prefix outputs (eval mode, prefix only); return how many."""
        todo = set(self.missing())
        if not todo:  # the usual case after the first participation: nothing to run or scan
            return 0
        done = 0
        for rows in batches:
            rows = torch.tensor([int(i) for i in rows if int(i) in todo], dtype=torch.long)
            if len(rows) == 0:
                continue
            inputs = make_inputs(rows)
            hidden, returns_tuple = run_prefix(model, self.first_trained, inputs)
            self.store(rows, hidden, inputs["attention_mask"], returns_tuple)
            done += len(rows)
        return done

    def select(self, rows: Tensor, device: torch.device) -> None:
        """Set the batch the next forward pass replays."""
        self._current = pad_batch(self.hidden, rows, device)

    @contextlib.contextmanager
    def replaying(self, model: nn.Module) -> Iterator[None]:
        def current() -> Tensor:
            if self._current is None:
                raise RuntimeError("no cached batch selected before the forward pass")
            return self._current

        with replay_prefix(model, self.first_trained, current, returns_tuple=self.returns_tuple):
            yield
        self._current = None
