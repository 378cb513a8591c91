"""Tokens a step's rows may not choose, and rows whose next token is forced.

Planned on the host (min_tokens bans, the checkpoint's banned tokens, beams' n-gram bans, a
forced EOS) and applied on the device to a step's scores. The mask travels as arrays with the
step's one host-to-device copy: a Python list turned into a device index inside the step would
copy from pageable memory, which waits for everything queued on the stream (on a GPU, one such
wait per beam request cost a beam step more than its forward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch


@dataclass
class TokenMask:
    bans: list[tuple[int, int]] = field(default_factory=list)  # (row, token) never chosen
    banned: list[int] = field(default_factory=list)  # never chosen, in any row
    forced_rows: list[int] = field(default_factory=list)  # must take forced_token
    forced_token: int = 0

    def on_rows(self, rows: list[int]) -> TokenMask:
        """The same mask with row i renamed rows[i] (e.g. sampling rows -> logits rows)."""
        return TokenMask(
            [(rows[r], token) for r, token in self.bans],
            self.banned,
            [rows[r] for r in self.forced_rows],
            self.forced_token,
        )

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """What `apply` reads from the step's tensors, under names starting with `prefix`."""
        out: dict[str, np.ndarray] = {}
        if self.bans:
            pairs = chain.from_iterable(self.bans)  # ~2x faster than np.array of tuples
            out[prefix + "bans"] = np.fromiter(pairs, np.int64, 2 * len(self.bans)).reshape(-1, 2)
        if self.banned:
            out[prefix + "banned"] = np.array(self.banned, dtype=np.int64)
        if self.forced_rows:
            out[prefix + "forced"] = np.array(self.forced_rows, dtype=np.int64)
        return out

    def apply(self, scores: torch.Tensor, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """scores [R, V] in place: banned tokens -inf; then forced rows score 0 for the
        forced token and -inf for every other (a forced token overrides bans, as in
        transformers, whose forced-EOS processor runs last)."""
        bans = tensors.get(prefix + "bans")
        if bans is not None:
            scores.index_put_((bans[:, 0], bans[:, 1]), scores.new_full((), float("-inf")))
        banned = tensors.get(prefix + "banned")
        if banned is not None:
            scores.index_fill_(1, banned, float("-inf"))
        forced = tensors.get(prefix + "forced")
        if forced is not None:
            scores.index_fill_(0, forced, float("-inf"))
            column = torch.full_like(forced, self.forced_token)
            scores.index_put_((forced, column), scores.new_zeros(()))
