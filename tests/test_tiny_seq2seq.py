"""The tiny translation-model fixtures themselves (tests/tiny_seq2seq.py): transformers loads
what they save, their tokenizers round-trip text and put special tokens where the real
ones do, and generation behaves like a translation model's (forced BOS, EOS reached)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_seq2seq import DE_WORDS, EN_WORDS, build_m2m100, build_marian, corpus

TEXTS = ["The quick brown fox jumps over the lazy dog.", "My teacher asked his friend for advice!"]


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory):
    return build_marian(tmp_path_factory.mktemp("marian"))


@pytest.fixture(scope="module")
def nllb_dir(tmp_path_factory):
    return build_m2m100(tmp_path_factory.mktemp("nllb"))


def load(directory, **tokenizer_kwargs):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, **tokenizer_kwargs)
    model = AutoModelForSeq2SeqLM.from_pretrained(directory).eval()
    return tokenizer, model


def ended(sequences: torch.Tensor, eos: int, skip: int) -> int:
    """How many generations (after `skip` leading tokens) contain EOS."""
    return sum(int(eos in row[skip:].tolist()) for row in sequences)


def test_marian_files_and_ids(marian_dir):
    names = {p.name for p in marian_dir.iterdir()}
    assert {"source.spm", "target.spm", "vocab.json", "model.safetensors"} <= names
    tokenizer, model = load(marian_dir)
    assert type(tokenizer).__name__ == "MarianTokenizer"
    vocab = json.loads((marian_dir / "vocab.json").read_text())
    # OPUS-MT's layout: </s> 0, <unk> 1, <pad> last; the model's vocab is the tokenizer's
    assert (vocab["</s>"], vocab["<unk>"], vocab["<pad>"]) == (0, 1, len(vocab) - 1)
    assert model.config.vocab_size == len(tokenizer) == len(vocab)
    assert tokenizer.eos_token_id == model.config.eos_token_id == 0
    pad = tokenizer.pad_token_id
    assert model.config.decoder_start_token_id == model.config.pad_token_id == pad
    assert model.generation_config.bad_words_ids is None  # left out on purpose (docstring)
    assert torch.all(model.get_input_embeddings().weight[pad] == 0)  # decoder starts from 0
    assert model.config.activation_function == "swish" and model.config.scale_embedding


def test_marian_tokenizer_round_trip(marian_dir):
    tokenizer, _ = load(marian_dir)
    for text in [*TEXTS, *corpus(EN_WORDS, 5, seed=3)]:
        ids = tokenizer(text).input_ids
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # the target side (German-ish) is tokenized by target.spm with the same vocab
    for text in corpus(DE_WORDS, 5, seed=3):
        ids = tokenizer(text_target=text).input_ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_marian_generate(marian_dir):
    tokenizer, model = load(marian_dir)
    sources = corpus(EN_WORDS, 16, seed=7)
    batch = tokenizer(sources, return_tensors="pt", padding=True)
    greedy = model.generate(**batch, max_new_tokens=30, do_sample=False, num_beams=1)
    beam = model.generate(**batch, max_new_tokens=30, do_sample=False, num_beams=2)
    start = tokenizer.pad_token_id
    assert (greedy[:, 0] == start).all() and (beam[:, 0] == start).all()
    assert 0 < ended(greedy, tokenizer.eos_token_id, 1) < len(sources)  # some stop early
    assert len(set(greedy[:, 1].tolist())) > 3  # the output depends on the source
    text = tokenizer.batch_decode(greedy, skip_special_tokens=True)
    assert all(isinstance(t, str) for t in text)


def test_nllb_tokenizer(nllb_dir):
    tokenizer, model = load(nllb_dir, src_lang="fra_Latn")
    assert type(tokenizer).__name__ == "NllbTokenizer"
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"])
    assert ids == [0, 1, 2, 3]
    codes = tokenizer.convert_tokens_to_ids(["eng_Latn", "deu_Latn", "fra_Latn", "<mask>"])
    assert len(set(codes)) == 4 and codes[-1] == len(tokenizer) - 1
    assert all(code in tokenizer.all_special_ids for code in codes)
    for text in [*TEXTS, *corpus(DE_WORDS, 5, seed=3)]:
        ids = tokenizer(text).input_ids
        # NLLB (non-legacy): [src_lang] tokens </s>
        assert ids[0] == tokenizer.convert_tokens_to_ids("fra_Latn") and ids[-1] == 2
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    tokenizer.src_lang = "deu_Latn"
    assert tokenizer("Hallo").input_ids[0] == tokenizer.convert_tokens_to_ids("deu_Latn")


def test_nllb_generate_forced_bos(nllb_dir):
    tokenizer, model = load(nllb_dir, src_lang="eng_Latn")
    assert model.config.decoder_start_token_id == 2 == model.config.eos_token_id
    assert model.generation_config.forced_bos_token_id is None  # callers pass it
    sources = corpus(EN_WORDS, 16, seed=7)
    batch = tokenizer(sources, return_tensors="pt", padding=True)
    german = tokenizer.convert_tokens_to_ids("deu_Latn")
    outs = [
        model.generate(**batch, max_new_tokens=30, num_beams=beams, forced_bos_token_id=german)
        for beams in (1, 2)
    ]
    for out in outs:
        assert (out[:, 0] == 2).all() and (out[:, 1] == german).all()
    assert 0 < ended(outs[0], 2, 2) < len(sources)
    assert len(set(outs[0][:, 2].tolist())) > 2
    free = model.generate(**batch, max_new_tokens=4, num_beams=1)
    assert not (free[:, 1] == german).all()  # the language code came from forcing


def test_m2m100_tokenizer(tmp_path):
    directory = build_m2m100(tmp_path, nllb=False)
    tokenizer, model = load(directory, src_lang="en", tgt_lang="de")
    assert type(tokenizer).__name__ == "M2M100Tokenizer"
    ids = tokenizer(TEXTS[0]).input_ids
    assert ids[0] == tokenizer.get_lang_id("en") and ids[-1] == 2
    # transformers 5 keeps `__en__` in skip_special_tokens decoding of M2M100Tokenizer
    assert tokenizer.decode(ids[1:], skip_special_tokens=True) == TEXTS[0]
    assert model.config.vocab_size > max(tokenizer.lang_token_to_id.values())
    out = model.generate(
        **tokenizer(TEXTS, return_tensors="pt", padding=True),
        max_new_tokens=8,
        forced_bos_token_id=tokenizer.get_lang_id("de"),
    )
    assert (out[:, 1] == tokenizer.get_lang_id("de")).all()


def test_builds_are_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = load_file(build_marian(tmp_path / "a") / "model.safetensors")
    b = load_file(build_marian(tmp_path / "b") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    vocab = [(tmp_path / name / "vocab.json").read_text() for name in "ab"]
    assert vocab[0] == vocab[1]
