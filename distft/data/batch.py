"""A batch: what the model is fed for one micro-batch, and how rows of samples become one.

Rows are right-padded to the longest; a row of several samples is packed (positions restart
at 0 per sample, isolated by a block-diagonal causal mask or by the position ids alone: see
`distft.data.loader`). Rows of preference pairs also carry `seq_ids`, the sequence each
position belongs to (`distft.data.pairs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from distft.data.tokenize import IGNORE

Row = list[tuple[np.ndarray, np.ndarray]]  # the (ids, labels) samples of one row


MASKS = {"sdpa": "bool", "eager": "additive"}  # the 4-D mask each attention takes


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The token each position predicts (IGNORE where none is trained)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


@dataclass(frozen=True)
class Targets:
    """Where a batch's targets are, found once where the batch is built (collation, on the
    host). The objectives select the target rows with `index_select` on this index, whose
    length the host knows, instead of a boolean mask: on a GPU a mask's count (and
    `bincount`, `max`, `.item()`) makes the host wait for the device."""

    shape: tuple[int, int]  # (rows, length) of the batch's positions
    index: torch.Tensor  # flat position (row * length + column) of each target, ascending
    tokens: torch.Tensor  # the token each of those positions predicts
    n_seqs: int  # sequences numbered in `seq_ids` (0 without)

    @classmethod
    def of(
        cls, labels: torch.Tensor, shift_labels: torch.Tensor | None, seq_ids: torch.Tensor | None
    ) -> Targets:
        predicted = shifted_targets(labels) if shift_labels is None else shift_labels
        flat = predicted.reshape(-1)
        index = torch.nonzero(flat != IGNORE).view(-1)
        n_seqs = int(seq_ids.max()) + 1 if seq_ids is not None and seq_ids.numel() else 0
        rows, length = predicted.shape
        return cls((rows, length), index, flat.index_select(0, index), n_seqs)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Targets:
        return Targets(self.shape, fn(self.index), fn(self.tokens), self.n_seqs)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    # None: one sample per row, right-padded (SDPA's fast causal path), or packed rows
    # whose mask is not built yet (`mask`); 4-D: the block-diagonal causal mask of packed
    # rows.
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None = None  # packed rows: restart at 0 per sample
    n_tokens: int = 0  # real (non-pad) tokens
    # A slice of longer sequences (distft.seqpar): the token each position predicts, taken
    # from the whole sequence before it was split (a slice's last position predicts the
    # next slice's first token). None: the labels moved one left.
    shift_labels: torch.Tensor | None = None
    # Packed rows that need a 4-D mask ("bool" for SDPA, "additive" for eager): built from
    # the position ids where the batch runs (`to`, `model_inputs`), never on the host first.
    mask: str | None = None
    # Preference pairs (distft.data.pairs): the sequence each position belongs to (2p: the
    # p-th pair's chosen side, 2p+1 its rejected side; -1 on padding), and the reference's
    # summed response log-probs of each sequence (None: not precomputed).
    seq_ids: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    # Found from the labels when the batch is built (None here) and carried along by `to`
    # and `pin_memory`: read it as `targets`.
    found: Targets | None = None

    def __post_init__(self) -> None:
        if self.found is None:  # where the batch is built: on the host, once
            targets = Targets.of(self.labels, self.shift_labels, self.seq_ids)
            object.__setattr__(self, "found", targets)

    @property
    def targets(self) -> Targets:
        assert self.found is not None  # __post_init__
        return self.found

    @property
    def n_seqs(self) -> int:
        return self.targets.n_seqs

    @property
    def n_targets(self) -> int:
        """Tokens that contribute to the loss (labels are shifted by one)."""
        return self.targets.index.numel()

    def model_inputs(self) -> dict[str, torch.Tensor | bool]:
        out: dict[str, torch.Tensor | bool] = {"input_ids": self.input_ids}
        attention_mask = self._built_mask()
        if attention_mask is not None:
            out["attention_mask"] = attention_mask
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
            # No cache: transformers finds packed samples in the position ids only without
            # one (masking_utils._preprocess_mask_arguments), and training needs none.
            out["use_cache"] = False
        return out

    def _built_mask(self) -> torch.Tensor | None:
        if self.attention_mask is not None or self.mask is None or self.position_ids is None:
            return self.attention_mask
        return block_causal_mask(self.position_ids, additive=self.mask == "additive")

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        """On `device`, with a packed batch's mask built there. `non_blocking` from pinned
        memory (`pin_memory`) lets the copy overlap the GPU's work."""
        moved = self._map(lambda t: t.to(device, non_blocking=non_blocking))
        return replace(moved, attention_mask=moved._built_mask())

    def pin_memory(self) -> Batch:
        """In page-locked host memory, for a non-blocking copy to the GPU."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        def each(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return Batch(
            fn(self.input_ids),
            fn(self.labels),
            each(self.attention_mask),
            each(self.position_ids),
            self.n_tokens,
            each(self.shift_labels),
            self.mask,
            each(self.seq_ids),
            each(self.ref_logps),
            self.targets.map(fn),
        )


def block_causal_mask(position_ids: torch.Tensor, additive: bool = False) -> torch.Tensor:
    """The 4-D (rows, 1, w, w) mask of packed rows, on `position_ids`' device: a token sees
    the tokens of its own sample up to itself. Samples (and a row's padding) start where
    the positions restart at 0. Bool for SDPA (True: attend); `additive` for eager: 0 where
    attended, float32's minimum elsewhere (added to the scores)."""
    segment = torch.cumsum(position_ids == 0, dim=1)
    width = position_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril_()
    block = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    if not additive:
        return block
    scores = torch.zeros(block.shape, dtype=torch.float32, device=block.device)
    return scores.masked_fill_(~block, torch.finfo(torch.float32).min)


def collate_rows(
    rows: list[Row],
    pad_id: int,
    attn: str = "sdpa",
    windowed: bool = False,
    segments: bool = False,
) -> Batch:
    """Right-pad rows to the longest; a row of several samples is packed (isolated). With
    `windowed` (a model with sliding windows) packed rows carry position ids and no mask,
    and transformers builds each layer's mask from them. `segments`: number the samples
    in order (`Batch.seq_ids`)."""
    packed = any(len(r) > 1 for r in rows)
    if packed and attn == "flash_attention_2":
        rows = [[s for r in rows for s in r]]  # one row: varlen kernel from position ids
    lengths = [sum(len(ids) for ids, _ in r) for r in rows]
    n, width = len(rows), max(lengths)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE, dtype=np.int64)
    pos = np.zeros((n, width), dtype=np.int64)
    seq = np.full((n, width), -1, dtype=np.int64)
    k = 0
    for i, row in enumerate(rows):
        at = 0
        for s_ids, s_labels in row:
            m = len(s_ids)
            ids[i, at : at + m], labels[i, at : at + m] = s_ids, s_labels
            labels[i, at] = IGNORE  # never predicted from the previous sample's last token
            pos[i, at : at + m] = np.arange(m)
            seq[i, at : at + m], k = k, k + 1
            at += m
        pos[i, at:] = np.arange(width - at)  # padding: its own block (positions restart)
    real = sum(lengths)
    out_ids, out_labels = torch.from_numpy(ids), torch.from_numpy(labels)
    seq_ids = torch.from_numpy(seq) if segments else None
    if not packed:
        # Right padding needs no mask: under causal attention no real token looks at the
        # pads after it, and pads carry no labels. Loss and gradients are exact, and SDPA
        # keeps its fast mask-free causal path.
        return Batch(out_ids, out_labels, None, None, real, seq_ids=seq_ids)
    position_ids = torch.from_numpy(pos)
    # eager attention adds the mask to the scores; SDPA takes booleans; flash-attention's
    # varlen kernel and transformers' windowed masks read the position ids alone
    mask = None if attn == "flash_attention_2" or windowed else MASKS.get(attn, "bool")
    return Batch(out_ids, out_labels, None, position_ids, real, mask=mask, seq_ids=seq_ids)
