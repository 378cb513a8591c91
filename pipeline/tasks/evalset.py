"""evalset: n samples per prompt, each with its finish reason and per-token log-probs, and the
row's seed, so that an evaluation set can be rebuilt and its samples scored."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.engine.params import RequestParams, SamplingParams
from pipeline.tasks.base import Task

if TYPE_CHECKING:
    from pipeline.engine.outputs import RequestOutput

TOP_LOGPROB = pa.struct([("token_id", pa.int32()), ("logprob", pa.float32())])


class EvalsetTask(Task):
    name = "evalset"
    extra_fields = (
        pa.field("seed", pa.int64()),  # the request's seed: rerunning it gives the same samples
        # [output][generated token] -> top log-probs, most likely first (the chosen one included)
        pa.field("logprobs", pa.list_(pa.list_(pa.list_(TOP_LOGPROB)))),
    )

    def result_columns(self, out: RequestOutput, params: RequestParams) -> dict[str, Any]:
        columns = super().result_columns(out, params)
        columns["seed"] = params.seed if isinstance(params, SamplingParams) else None
        columns["logprobs"] = [_top_logprobs(o.logprobs) for o in out.outputs]
        return columns


def _top_logprobs(per_token: list[dict[int, float]] | None) -> list[list[dict[str, Any]]] | None:
    if per_token is None:
        return None
    return [
        [{"token_id": t, "logprob": p} for t, p in sorted(top.items(), key=lambda kv: -kv[1])]
        for top in per_token
    ]
