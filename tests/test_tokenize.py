"""Worker-side tokenization: prompts as the job builds them, bad rows flagged, never dropped."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import TRANSLATE_TEMPLATE, TaskConfig
from pipeline.io.shards import discover_shards, plan_units
from pipeline.tokenize import TokenizeSpec, model_limits, tokenize_unit


def _units(path: Path):
    return plan_units(discover_shards(str(path)), None)[1]


def _spec(model_dir: Path, **kw) -> TokenizeSpec:
    kw.setdefault("task", TaskConfig())
    return TokenizeSpec(model_path=str(model_dir), text_column="text", id_column="id", **kw)


def test_bad_rows_get_errors_and_keep_their_place(tiny_llama_dir: Path, tmp_path: Path) -> None:
    texts = [b"one two", None, b"   ", b"\xff\xfe broken", b"one " * 200, "zwölf drei".encode()]
    pq.write_table(pa.table({"text": pa.array(texts, pa.binary())}), tmp_path / "in.parquet")
    (unit,) = _units(tmp_path / "in.parquet")
    max_len, _ = model_limits(tiny_llama_dir)
    rows = tokenize_unit(unit, _spec(tiny_llama_dir, max_model_len=max_len)).rows
    assert [r.index for r in rows] == list(range(6))
    assert [r.id for r in rows] == [f"in.parquet:{i}" for i in range(6)]  # no id column
    kinds = [r.error_kind for r in rows]
    assert kinds == [None, "null_text", "empty_text", "invalid_utf8", "too_long", None]
    errors = [r.error for r in rows]
    assert errors[0] is None and errors[5] is None
    assert errors[1] == "text is null" and errors[2] == "text is empty"
    assert errors[3] is not None and "UTF-8" in errors[3]
    assert errors[4] is not None and "max_model_len=128" in errors[4]
    assert rows[0].token_ids and rows[5].token_ids


def test_translate_prompt_is_the_template_with_bos(tiny_llama_dir: Path, make_shards) -> None:
    from transformers import AutoTokenizer

    unit = _units(make_shards(num_shards=1, rows=3, row_group_size=3)[0])[0]
    rows = tokenize_unit(unit, _spec(tiny_llama_dir, extra_columns=("reference",))).rows
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = TRANSLATE_TEMPLATE.format(
        source_lang="English", target_lang="German", text=rows[0].text
    )
    assert rows[0].token_ids == tok(prompt, add_special_tokens=True)["input_ids"]
    assert rows[0].token_ids[0] == tok.bos_token_id
    assert rows[0].id == "s0-r0" and rows[0].reference == rows[0].text
    assert rows[0].extra == {"reference": rows[0].text}


def test_chat_template_wraps_the_prompt(tiny_llama_dir: Path, make_shards, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = "<s>{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    tok.save_pretrained(tmp_path / "chat")
    unit = _units(make_shards(num_shards=1, rows=1)[0])[0]
    task = TaskConfig(name="generate", system_prompt="one")
    (row,) = tokenize_unit(unit, _spec(tmp_path / "chat", task=task)).rows
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "one"}, {"role": "user", "content": row.text}],
        tokenize=False,
    )
    assert row.token_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    never = TaskConfig(name="generate", chat_template="never")
    (plain,) = tokenize_unit(unit, _spec(tmp_path / "chat", task=never)).rows
    assert plain.token_ids == tok(row.text)["input_ids"]
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_unit(unit, _spec(tiny_llama_dir, task=TaskConfig(chat_template="always")))


def test_a_plain_tokenizer_is_built_without_autotokenizer_and_is_the_same(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A checkpoint whose tokenizer_class is a plain one (PreTrainedTokenizerFast; transformers
    5 writes TokenizersBackend) skips AutoTokenizer (its
    model registry costs seconds per process) and gets the tokenizer AutoTokenizer gives;
    any other class still goes through AutoTokenizer."""
    import json
    import shutil

    import transformers

    from pipeline.models.tokenizer import load_tokenizer

    auto = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] in ("PreTrainedTokenizerFast", "TokenizersBackend")
    asked = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: asked.append(a) or real(*a)
    )
    direct = load_tokenizer(tiny_llama_dir)
    assert not asked and type(direct) is type(auto)
    for text in ["one two three", "zwölf  drei\n", "</s> <s>", ""]:
        ids = auto(text)["input_ids"]
        assert direct(text)["input_ids"] == ids
        assert direct.decode(ids, skip_special_tokens=True) == auto.decode(ids, True)
    assert direct.all_special_ids == auto.all_special_ids
    assert direct.padding_side == auto.padding_side

    other = tmp_path / "other"
    shutil.copytree(tiny_llama_dir, other)
    (other / "tokenizer_config.json").write_text(
        json.dumps(config | {"tokenizer_class": "LlamaTokenizerFast"})
    )
    load_tokenizer(other)
    assert asked == [(str(other),)]
