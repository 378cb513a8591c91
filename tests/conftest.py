"""Shared fixtures: a tiny random-weight HF Llama with its own tokenizer, Parquet shard
builders, and Hydra composition of `conf/`."""

from __future__ import annotations

import os

# Triton kernels run on CPU tensors under its interpreter. Triton reads this when a kernel
# module is imported, so it is set before any test imports `pipeline.kernels`.
if os.environ.get("PIPELINE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

WORDS = (  # noqa: SIM905 (easier to read as a sentence)
    "one two three four five six seven eight nine ten eleven twelve twenty thirty forty "
    "fifty hundred thousand eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf "
    "zwanzig dreißig vierzig fünfzig hundert tausend und translate from to english german"
).split()


def build_tokenizer(directory: Path):
    """A word-level tokenizer with <s> prepended by add_special_tokens=True, like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.WordLevelTrainer(special_tokens=specials)
    corpus = [" ".join(WORDS), "Translate from English to German.\nEnglish: one\nGerman: eins"]
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.save_pretrained(directory)
    return fast


def build_tiny_llama(directory: Path, max_position_embeddings: int = 128) -> Path:
    """Random weights, HF format (config.json + model.safetensors + tokenizer files)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def sample_text(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % 12] for k in range(1 + i % 6))


ShardMaker = Callable[..., list[Path]]


def write_shards(
    directory: Path,
    num_shards: int = 3,
    rows: int = 10,
    row_group_size: int = 4,
    with_id: bool = True,
    bad_rows: bool = False,
) -> list[Path]:
    """Write `num_shards` Parquet files of `rows` rows (row groups of `row_group_size`)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        texts: list[str | None] = [sample_text(s * rows + i) for i in range(rows)]
        if bad_rows:
            texts[1], texts[2] = None, "   "
        columns = {"text": texts, "reference": [t or "" for t in texts]}
        if with_id:
            columns = {"id": [f"s{s}-r{i}" for i in range(rows)], **columns}
        path = directory / f"part-{s:03d}.parquet"
        pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
        paths.append(path)
    return paths


@pytest.fixture
def make_shards(tmp_path: Path) -> ShardMaker:
    """`write_shards` into tmp_path/input unless another `directory` is given."""

    def make(directory: Path | None = None, **kw: object) -> list[Path]:
        return write_shards(directory or tmp_path / "input", **kw)  # type: ignore[arg-type]

    return make


def corrupt_row_group(path: Path, row_group: int) -> None:
    """Overwrite the row group's column chunks with garbage; the footer stays valid, so that
    discovery and planning see a normal shard and only reading that row group fails."""
    meta = pq.ParquetFile(path).metadata.row_group(row_group)
    chunks = [meta.column(i) for i in range(meta.num_columns)]
    starts = [
        c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in chunks
    ]
    end = max(s + c.total_compressed_size for s, c in zip(starts, chunks, strict=True))
    data = bytearray(path.read_bytes())
    data[min(starts) : end] = b"\xff" * (end - min(starts))
    path.write_bytes(data)


def job_overrides(
    model: Path, inputs: Path, out: Path, changes: dict[str, object] | None = None
) -> list[str]:
    """Overrides for a small, quiet job on a tiny model; `changes` sets or adds keys (a value
    of None drops the key)."""
    keys: dict[str, object] = {
        "model.path": model,
        "input.path": inputs,
        "output.dir": out,
        "engine": "cpu_small",
        "sampling.max_tokens": 4,
        "cluster.n_workers": 1,
        "metrics.progress": "false",
        "metrics.plot": "false",
        **(changes or {}),
    }
    return [f"{key}={value}" for key, value in keys.items() if value is not None]


def compose_config(overrides: list[str] | None = None) -> object:
    """Compose `conf/config.yaml` with overrides, as `python -m pipeline` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import pipeline.config  # noqa: F401  (registers the schema)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [])


@pytest.fixture
def compose() -> Callable[..., object]:
    return compose_config
