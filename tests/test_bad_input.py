"""Every kind of bad input row is isolated with an error kind; unusable input fails up front."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import tokenize
from pipeline.config import InputConfig, TaskConfig
from pipeline.engine.config import ConfigError
from pipeline.io.shards import discover_shards, plan_units
from pipeline.tasks import get_task
from pipeline.tasks.base import Task
from pipeline.tokenize import PromptRow, TokenizeSpec, check_text_type, tokenize_unit

EOS = 2  # "</s>" in the conftest tokenizer
ONE_MB = "one " * (1 << 18)
# A chat template in the tiny tokenizer's words: BOS and a generation prompt around each turn.
CHAT = (
    "<s>{% for m in messages %}{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}German:{% endif %}"
)
ROWS = [  # (text, expected error_kind)
    (b"one two", None),
    (None, "null_text"),
    (b"", "empty_text"),
    (b" \t\n ", "empty_text"),
    (b"\xff\xfe broken", "invalid_utf8"),
    ("zwölf drei".encode(), None),
    (b"one " * 200, "too_long"),
    (ONE_MB.encode(), "too_long"),
    (b"one </s> two", None),
]


@pytest.fixture(scope="module")
def chat_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama's tokenizer with a chat template (the tokenizer is all tokenize needs)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = CHAT
    directory = tmp_path_factory.mktemp("chat")
    tok.save_pretrained(directory)
    return directory


def _tokenize(model_dir: Path, path: Path, texts: list, **kw) -> list[PromptRow]:
    ids = [f"r{i}" for i in range(len(texts))]
    pq.write_table(pa.table({"id": ids, "text": pa.array(texts, pa.binary())}), path)
    (unit,) = plan_units(discover_shards(str(path)), None)[1]
    kw.setdefault("task", TaskConfig())
    kw.setdefault("max_model_len", 128)
    spec = TokenizeSpec(model_path=str(model_dir), text_column="text", id_column="id", **kw)
    return tokenize_unit(unit, spec).rows


def _ids(model_dir: Path, text: str, add_special_tokens: bool = False) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok(text, add_special_tokens=add_special_tokens)["input_ids"]


def test_every_bad_row_kind_gets_its_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    rows = _tokenize(tiny_llama_dir, tmp_path / "in.parquet", [t for t, _ in ROWS])
    assert [r.error_kind for r in rows] == [kind for _, kind in ROWS]
    assert [(r.index, r.id) for r in rows] == [(i, f"r{i}") for i in range(len(ROWS))]
    for row in rows:
        assert (row.error is None) == (row.error_kind is None)
        assert bool(row.token_ids) == (row.error_kind in (None, "too_long"))
        assert not row.truncated
    assert rows[1].error == "text is null"
    assert rows[2].error == rows[3].error == "text is empty"
    assert "not valid UTF-8" in str(rows[4].error) and "at byte 0" in str(rows[4].error)
    for row in rows[6:8]:
        assert "max_model_len=128" in str(row.error) and "input.truncate" in str(row.error)
    assert len(rows[7].token_ids) > 1 << 18  # counted, not cut: truncation is off by default
    assert EOS not in rows[8].token_ids  # a literal "</s>" stays text


def test_a_row_that_fails_to_tokenize_spares_its_neighbours(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    render = Task.render

    def fragile(self, text, tokenizer, fmt):
        if "boom" in text:
            raise ValueError("boom")
        return render(self, text, tokenizer, fmt)

    monkeypatch.setattr(Task, "render", fragile)
    rows = _tokenize(tiny_llama_dir, tmp_path / "in.parquet", [b"one", b"boom", b"two"])
    assert [r.error_kind for r in rows] == [None, "tokenization", None]
    assert rows[1].error == "tokenization failed: ValueError: boom" and rows[2].token_ids


def test_special_token_text_stays_text_unless_asked(
    tiny_llama_dir: Path, chat_dir: Path, tmp_path: Path
) -> None:
    texts = [b"one </s> two <s>"]
    for model_dir in (tiny_llama_dir, chat_dir):  # template and chat formats
        (row,) = _tokenize(model_dir, tmp_path / "in.parquet", texts)
        assert row.error is None and EOS not in row.token_ids
        assert row.token_ids.count(1) == 1  # the prompt's own BOS, none from the text
        (parsed,) = _tokenize(model_dir, tmp_path / "in.parquet", texts, parse_special_tokens=True)
        assert EOS in parsed.token_ids and parsed.token_ids.count(1) == 2


def test_special_tokens_of_the_template_still_parse(tiny_llama_dir: Path, tmp_path: Path) -> None:
    task = TaskConfig(prompt_template="{text} </s>")
    (row,) = _tokenize(tiny_llama_dir, tmp_path / "in.parquet", [b"one </s>"], task=task)
    assert row.token_ids[0] == 1 and row.token_ids[-1] == EOS and row.token_ids.count(EOS) == 1


@pytest.mark.parametrize("fmt", ["template", "chat"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_cuts_the_text_not_the_prompt(
    tiny_llama_dir: Path, chat_dir: Path, tmp_path: Path, side: str, fmt: str
) -> None:
    model_dir = chat_dir if fmt == "chat" else tiny_llama_dir
    text = "one " + "two " * 100 + "three"
    big = ONE_MB if fmt == "template" else "one " * 300  # the 1 MB row once per side: slow
    texts = [text.encode(), big.encode(), b"four five"]
    rows = _tokenize(
        model_dir,
        tmp_path / "in.parquet",
        texts,
        truncate=side,
        max_model_len=64,
        max_new_tokens=16,
    )
    prefix, suffix = _template_ids(model_dir, fmt)
    text_ids = _ids(model_dir, text)
    for row in rows[:2]:
        assert row.error is None and row.truncated
        assert 48 - 8 < len(row.token_ids) <= 48  # max_model_len - max_new_tokens, nearly full
        ids = row.token_ids
        assert ids[: len(prefix)] == prefix and ids[len(ids) - len(suffix) :] == suffix
    kept = rows[0].token_ids[len(prefix) : len(rows[0].token_ids) - len(suffix)]
    assert kept == (
        text_ids[len(text_ids) - len(kept) :] if side == "left" else text_ids[: len(kept)]
    )
    assert not rows[2].truncated and rows[2].error is None


def _template_ids(model_dir: Path, fmt: str) -> tuple[list[int], list[int]]:
    """The prompt's ids before and after the user text (BOS included)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rendered = get_task("translate")(TaskConfig()).render("MARK", tok, fmt)  # type: ignore[arg-type]
    before, after = rendered.split("MARK")
    return _ids(model_dir, before, add_special_tokens=fmt != "chat"), _ids(model_dir, after)


def test_truncation_without_offsets_decodes(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenize, "_token_spans", lambda text, prompter: None)
    text = "one " * 150 + "two three"
    (row,) = _tokenize(tiny_llama_dir, tmp_path / "in.parquet", [text.encode()], truncate="left")
    assert row.truncated and len(row.token_ids) <= 127 and row.token_ids[0] == 1
    assert row.token_ids[-4:] == _ids(tiny_llama_dir, "two three\nGerman:")


def test_a_template_too_long_to_truncate_is_an_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    (row,) = _tokenize(
        tiny_llama_dir, tmp_path / "in.parquet", [b"one two"], truncate="right", max_model_len=8
    )
    assert row.error_kind == "too_long" and "template alone is likely too long" in str(row.error)


def test_ordinary_text_takes_the_same_ids_through_the_literal_path(tiny_llama_dir: Path) -> None:
    """`encode_literal` (rows holding special-token text) tokenizes the rest as `encode`."""
    from tiny_models import word_tokenizer
    from transformers import AutoTokenizer

    llama = AutoTokenizer.from_pretrained(tiny_llama_dir)
    llama.chat_template = CHAT
    words = word_tokenizer()
    words.chat_template = "t1{% for m in messages %}t10 {{ m['content'] }} t11{% endfor %}"
    cases = [(llama, ["one two", " zwölf  drei ", "Translate one"]), (words, ["t5 t7 t33", "t44"])]
    for tok, texts in cases:
        for cfg in (TaskConfig(), TaskConfig(name="generate", system_prompt="one")):
            task = get_task(cfg.name)(cfg)
            for fmt in ("chat", "template", "raw"):
                today = task.encode(texts, tok, fmt, parse_special=True)
                assert [task.encode_literal(t, tok, fmt) for t in texts] == today


def test_non_string_text_column_is_a_config_error() -> None:
    schema = pa.schema([("id", pa.string()), ("text", pa.int64())])
    with pytest.raises(ConfigError, match=r"'text' in shard a\.parquet has type int64"):
        check_text_type(schema, "text", "a.parquet")
    for kind in (pa.string(), pa.large_string(), pa.binary(), pa.large_binary()):
        check_text_type(pa.schema([("text", kind)]), "text", "a.parquet")
    check_text_type(schema, "prompt", "a.parquet")  # missing: check_columns says so
    with pytest.raises(tokenize.RowError, match="text has type int") as raised:
        tokenize._user_text(5)  # a value the schema check let through still fails alone
    assert raised.value.kind == "not_string"


def test_truncate_key_is_validated() -> None:
    assert InputConfig().truncate == "none" and not InputConfig().parse_special_tokens
    with pytest.raises(ConfigError, match=r"input\.truncate must be none, left or right"):
        InputConfig(truncate="middle")
    with pytest.raises(ConfigError, match="got 'middle'"):
        TokenizeSpec("model", TaskConfig(), "text", "id", truncate="middle")
