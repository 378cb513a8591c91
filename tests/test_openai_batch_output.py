"""`output.format=openai_batch`: each committed shard's results also as `results/<shard>.jsonl`
in the OpenAI Batch API's output format (what `vllm run-batch` writes), derived from the
Parquet shard atomically and recorded, and written by the rerun when a crash came between
the Parquet shard and its JSONL."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import job_overrides

from pipeline.config import load_config
from pipeline.engine.config import ConfigError
from pipeline.io import writer as writer_module
from pipeline.io.faults import ENV
from pipeline.io.manifest import MANIFEST_NAME, Manifest
from pipeline.io.openai_output import OpenAIBatchOutput
from pipeline.io.writer import ResultWriter

REPO = Path(__file__).resolve().parents[1]
DEMO = Path("demo")  # model.path=demo: the bundled demo model
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def _request(custom_id: str, body: dict, url: str = CHAT) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _prompt(words: str) -> str:
    """The demo model's prompt (it translates English number words into German)."""
    return f"Translate from English to German.\nEnglish: {words}\nGerman:"


def _chat(words: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": _prompt(words)}]}


REQUESTS = [
    _request("chat-1", _chat("forty-two")),
    _request("cmpl-1", {"model": "m", "prompt": _prompt("three hundred")}, COMPLETIONS),
    _request("no-user", {"messages": [{"role": "system", "content": "no user message"}]}),
    _request("chat-2", _chat("seven thousand and five")),
    _request("cmpl-2", {"prompt": [_prompt("nineteen")], "max_tokens": 3}, COMPLETIONS),
]


def _write_requests(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    return path


def _overrides(inputs: Path, out: Path) -> list[str]:
    changes = {
        "input.format": "openai_batch",
        "input.id_column": "custom_id",
        "output.format": "openai_batch",
        "sampling.n": 2,
        "sampling.max_tokens": 12,
        "output.commit_rows": 2,  # several parts before the shard is assembled
    }
    return ["+job=generate", *job_overrides(DEMO, inputs, out, changes)]


def _lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def assert_matches_parquet(jsonl: Path, parquet: Path, model: str = "demo") -> None:
    """Every request answered once, in input order, with the Parquet row's outputs as its
    choices; the failed request as an error line."""
    rows = pq.read_table(parquet).to_pylist()
    lines = _lines(jsonl)
    assert any(o["text"].strip() for row in rows for o in row["outputs"])  # the model answers
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in REQUESTS]
    assert [row["custom_id"] for row in rows] == [r["custom_id"] for r in REQUESTS]
    assert len({line["id"] for line in lines}) == len(lines)
    for line, row, request in zip(lines, rows, REQUESTS, strict=True):
        response = line["response"]
        assert set(line) == {"id", "custom_id", "response", "error"}
        if row["error"] is not None:
            assert response["status_code"] == 400 and response["body"] is None
            assert line["error"] == {"code": "invalid_request", "message": row["error"]}
            continue
        assert line["error"] is None and response["status_code"] == 200
        body = response["body"]
        chat = request["url"] == CHAT
        assert body["object"] == ("chat.completion" if chat else "text_completion")
        assert body["id"].startswith("chatcmpl-" if chat else "cmpl-")
        assert body["model"] == model and isinstance(body["created"], int)
        choices = body["choices"]
        assert [c["index"] for c in choices] == [0, 1]  # sampling.n=2: two choices
        for choice, output in zip(choices, row["outputs"], strict=True):
            text = choice["message"]["content"] if chat else choice["text"]
            if chat:
                assert choice["message"]["role"] == "assistant" and "text" not in choice
            assert text == output["text"]
            assert choice["finish_reason"] == output["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert usage["prompt_tokens"] == row["num_prompt_tokens"] > 0
        assert usage["completion_tokens"] == row["num_output_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def _expected_bytes(results: Path, shard: str = "batch.parquet") -> bytes:
    """What the JSONL must hold: derived from the committed Parquet shard."""
    buffer = io.BytesIO()
    OpenAIBatchOutput("custom_id", "demo").write(results / shard, shard, buffer)
    return buffer.getvalue()


def test_openai_batch_job_writes_jsonl_answers_beside_the_parquet(compose, tmp_path: Path) -> None:
    from pipeline.run import run

    inputs = _write_requests(tmp_path / "input" / "batch.jsonl")
    out = tmp_path / "out"
    summary = run(compose(_overrides(inputs, out)))
    assert (summary["rows"], summary["error_rows"]) == (5, 1)
    results = out / "results"
    assert sorted(p.name for p in results.iterdir()) == [
        MANIFEST_NAME,
        "batch.jsonl",
        "batch.parquet",
    ]
    assert_matches_parquet(results / "batch.jsonl", results / "batch.parquet")
    assert "url" in pq.read_schema(results / "batch.parquet").names  # copied for the JSONL
    record = Manifest(results).derived["batch.parquet"]
    assert record == {"shard": "batch.parquet", "jsonl": "batch.jsonl", "rows": 5}

    # A rerun skips the shard and leaves its JSONL as it is.
    before = (results / "batch.jsonl").read_bytes()
    again = run(compose(_overrides(inputs, out)))
    assert again["shards_skipped"] == ["batch.parquet"]
    assert (results / "batch.jsonl").read_bytes() == before == _expected_bytes(results)


def test_crash_between_parquet_shard_and_jsonl_is_repaired_by_the_rerun(
    compose, tmp_path: Path
) -> None:
    from pipeline.run import run

    inputs = _write_requests(tmp_path / "input" / "batch.jsonl")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), ENV: "jsonl_pending"}
    args = [*_overrides(inputs, out), f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=300,
        start_new_session=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    results = out / "results"
    assert Manifest(results).is_committed("batch.parquet")  # the Parquet shard is done
    assert not (results / "batch.jsonl").exists()

    summary = run(compose(_overrides(inputs, out)))
    assert summary["shards_skipped"] == ["batch.parquet"] and summary["rows"] == 0
    assert_matches_parquet(results / "batch.jsonl", results / "batch.parquet")
    assert (results / "batch.jsonl").read_bytes() == _expected_bytes(results)
    assert Manifest(results).has_derived("batch.parquet", "batch.jsonl")


class _Crash(BaseException):
    pass


def _row(custom_id: str, url: str, text: str | None) -> dict:
    if text is None:
        outputs, error, tokens = [], "text is null", 0
    else:
        outputs, error, tokens = [{"text": text, "finish_reason": "length"}], None, 2
    return {
        "custom_id": custom_id,
        "url": url,
        "outputs": outputs,
        "num_prompt_tokens": 3 if text else None,
        "num_output_tokens": tokens,
        "error": error,
    }


SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("url", pa.string()),
        ("outputs", pa.list_(pa.struct([("text", pa.string()), ("finish_reason", pa.string())]))),
        ("num_prompt_tokens", pa.int32()),
        ("num_output_tokens", pa.int32()),
        ("error", pa.string()),
    ]
)


@pytest.mark.parametrize("point", ["temp_written:4", "jsonl_renamed"])
def test_writer_never_leaves_a_half_written_or_unrecorded_jsonl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """A crash while the JSONL is written (temp file) or after its rename (no manifest line):
    the rerun removes the temp file and writes the JSONL whole, and records it."""
    name, nth = point.partition(":")[::2]
    reached = {"n": 0}

    def crash_point(at: str) -> None:
        if at == name:
            reached["n"] += 1
            if reached["n"] == int(nth or 1):
                raise _Crash(at)

    derived = OpenAIBatchOutput("custom_id", "m")
    rows = [_row("a", CHAT, "x y"), _row("b", COMPLETIONS, "z"), _row("c", CHAT, None)]
    monkeypatch.setattr(writer_module, "crash_point", crash_point)
    writer = ResultWriter(tmp_path, commit_rows=2, derived=derived)
    writer.expect("s.parquet", 3, SCHEMA)
    with pytest.raises(_Crash):
        for i in (2, 0, 1):
            writer.put("s.parquet", i, rows[i])
    monkeypatch.undo()
    assert writer.manifest.is_committed("s.parquet")
    temps = list(tmp_path.glob(".s.jsonl.tmp-*"))
    assert bool(temps) == (name == "temp_written") != (tmp_path / "s.jsonl").exists()
    assert not Manifest(tmp_path).has_derived("s.parquet", "s.jsonl")

    rerun = ResultWriter(tmp_path, derived=derived)
    rerun.finish_committed("s.parquet")
    assert not list(tmp_path.glob(".*.tmp-*"))
    assert Manifest(tmp_path).has_derived("s.parquet", "s.jsonl")
    lines = _lines(tmp_path / "s.jsonl")
    assert [line["custom_id"] for line in lines] == ["a", "b", "c"]
    assert lines[0]["response"]["body"]["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "x y"},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert lines[1]["response"]["body"]["choices"][0]["text"] == "z"
    assert lines[1]["response"]["body"]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
    }
    assert lines[2]["response"]["status_code"] == 400
    assert lines[2]["error"] == {"code": "invalid_request", "message": "text is null"}


def test_openai_batch_output_needs_openai_batch_input(compose, tmp_path: Path) -> None:
    overrides = job_overrides(DEMO, tmp_path, tmp_path, {"output.format": "openai_batch"})
    with pytest.raises(ConfigError, match=r"output\.format=openai_batch .*input\.format"):
        load_config(compose(overrides))
    with pytest.raises(ConfigError, match=r"output\.format must be one of parquet, openai_batch"):
        load_config(compose(job_overrides(DEMO, tmp_path, tmp_path, {"output.format": "csv"})))


def test_a_shard_committed_without_the_url_column_is_named(tmp_path: Path) -> None:
    """Switching an output.dir written with output.format=parquet to openai_batch: the
    committed shard cannot be answered, and the error says what to do."""
    schema = SCHEMA.remove(SCHEMA.get_field_index("url"))
    writer = ResultWriter(tmp_path)
    writer.expect("s.parquet", 1, schema)
    row = _row("a", CHAT, "x")
    del row["url"]
    writer.put("s.parquet", 0, row)
    rerun = ResultWriter(tmp_path, derived=OpenAIBatchOutput("custom_id", "m"))
    with pytest.raises(ConfigError, match=r"s\.parquet has no 'url' column.*Delete it"):
        rerun.finish_committed("s.parquet")
    assert not (tmp_path / "s.jsonl").exists()
