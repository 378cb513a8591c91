"""Tiny random-weight encoder-decoder translation models, with real tokenizers, as HF dirs.

`build_marian` saves a MarianMTModel (OPUS-MT layout: post-LN, swish, sinusoidal positions,
tied embeddings, decoder starting from <pad>) with a MarianTokenizer: two SentencePiece
models (source.spm, target.spm) trained here on a built-in English / German-ish corpus and
the shared vocab.json that maps the pieces of both (`</s>` 0, `<unk>` 1, `<pad>` last, as
in Helsinki-NLP/opus-mt-*).

`build_m2m100` saves an M2M100ForConditionalGeneration (pre-LN, relu, decoder starting from
</s>) with an NLLB tokenizer (NllbTokenizer, i.e. the fast one, from a SentencePiece BPE
model trained here; all of NLLB's language codes as special tokens, `<mask>` last) or, with
`nllb=False`, the M2M100Tokenizer (vocab.json + sentencepiece.bpe.model, `__en__` codes).

Both are saved with `save_pretrained` (safetensors), so `transformers` and our engine load
the same directory. Weights are rescaled so that next-token distributions are peaked
(few near-ties between two implementations' argmax) and EOS is likely enough to end some
sequences early (stopping and beam finishing get exercised); `eos_boost=0` makes EOS rare.

Generation configs leave out what real checkpoints add on top of the architecture, so that
parity tests compare the model and the search only: OPUS-MT's `bad_words_ids=[[pad]]` and
`forced_eos_token_id=0` (transformers applies both inside `generate`), NLLB's
`forced_bos_token_id` (callers pass the target language's code to `generate`).
"""

from __future__ import annotations

import functools
import io
import json
import random
from pathlib import Path

import torch

# ~100 words per language; German-ish side keeps umlauts and ß so that the vocab has
# multi-byte characters.
EN_WORDS = (  # noqa: SIM905
    "the a an one two three four five small big old new red green blue house cat dog tree "
    "car book letter reads writes sees has is was will can and or but not with from to in "
    "on at by for of very quick brown fox jumps over lazy river city water light night day "
    "morning evening friend teacher asked his her their our advice translation model "
    "language sentence word short long today tomorrow yesterday always never often here "
    "there where when why how what who this that these those people children school work "
    "home garden street train station window door table chair"
).split()
DE_WORDS = (  # noqa: SIM905
    "der die das ein eine eins zwei drei vier fünf klein groß alt neu rot grün blau Haus "
    "Katze Hund Baum Auto Buch Brief liest schreibt sieht hat ist war wird kann und oder "
    "aber nicht mit von zu in auf an bei für sehr schnell braun Fuchs springt über faul "
    "Fluss Stadt Wasser Licht Nacht Tag Morgen Abend Freund Lehrer fragte sein ihr unser Rat "
    "Übersetzung Modell Sprache Satz Wort kurz lang heute morgen gestern immer nie oft hier "
    "dort wo wann warum wie was wer dieser jener Leute Kinder Schule Arbeit Hause Garten "
    "Straße Zug Bahnhof Fenster Tür Tisch Stuhl größer Grüße weiß"
).split()

NLLB_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # fairseq's first four ids


def corpus(words: list[str], count: int, seed: int) -> list[str]:
    """`count` deterministic sentences of 3-14 words, capitalised, with punctuation."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        lines.append(text[0].upper() + text[1:] + rng.choice([".", ".", "!", "?", ","]))
    return lines


@functools.lru_cache(maxsize=16)
def train_spm(lang: str, vocab_size: int, model_type: str, seed: int = 0) -> bytes:
    """A SentencePiece model (serialized proto) trained on the built-in corpus of `lang`
    ("en", "de" or "mixed"). Cached per process: every build with the same arguments gets
    the same bytes."""
    import sentencepiece as spm

    words = {"en": EN_WORDS, "de": DE_WORDS, "mixed": EN_WORDS + DE_WORDS}[lang]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(words, 3000, seed)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        hard_vocab_limit=False,  # a small corpus may support fewer pieces than asked
        # identity: the tokenizers-library NLLB tokenizer has no precompiled charsmap to
        # mirror nmt_nfkc without protobuf; both sides then normalise identically (not at all)
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _processor(proto: bytes):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=proto)


def _pieces(proto: bytes) -> list[str]:
    """The model's ordinary pieces (no <unk>, <s>, </s>), in id order."""
    sp = _processor(proto)
    return [
        sp.id_to_piece(i)
        for i in range(sp.get_piece_size())
        if not (sp.is_unknown(i) or sp.is_control(i))
    ]


def write_marian_tokenizer(directory: Path, vocab_size: int = 256, seed: int = 0):
    """source.spm (English), target.spm (German-ish) and the joint vocab.json; returns the
    MarianTokenizer loaded from them (also saved: tokenizer_config.json)."""
    from transformers import MarianTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    source = train_spm("en", vocab_size, "unigram", seed)
    target = train_spm("de", vocab_size, "unigram", seed)
    (directory / "source.spm").write_bytes(source)
    (directory / "target.spm").write_bytes(target)
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in _pieces(source) + _pieces(target):
        vocab.setdefault(piece, len(vocab))
    vocab["<pad>"] = len(vocab)  # last, as in OPUS-MT (CTranslate2 drops it there)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1))
    tokenizer = MarianTokenizer(
        source_spm=str(directory / "source.spm"),
        target_spm=str(directory / "target.spm"),
        vocab=str(directory / "vocab.json"),
        source_lang="en",
        target_lang="de",
        model_max_length=512,
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def write_nllb_tokenizer(directory: Path, vocab_size: int = 320, seed: int = 0):
    """NllbTokenizer (fast) built from a SentencePiece BPE model the way transformers
    converts one: fairseq's <s> <pad> </s> <unk>, then the pieces (spm id + 1), then the
    language codes, then <mask>. Saved as tokenizer.json + tokenizer_config.json, plus the
    sentencepiece.bpe.model it came from."""
    from transformers import NllbTokenizer
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES
    from transformers.tokenization_utils_base import generate_merges

    directory.mkdir(parents=True, exist_ok=True)
    proto = train_spm("mixed", vocab_size, "bpe", seed)
    (directory / "sentencepiece.bpe.model").write_bytes(proto)
    sp = _processor(proto)
    spm_vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    vocab = {token: i for i, token in enumerate(NLLB_SPECIALS)}
    for piece in _pieces(proto):
        vocab.setdefault(piece, len(vocab))
    for code in [*FAIRSEQ_LANGUAGE_CODES, "<mask>"]:
        vocab[code] = len(vocab)
    tokenizer = NllbTokenizer(
        vocab=vocab,
        merges=generate_merges(spm_vocab),
        src_lang="eng_Latn",
        model_max_length=1024,
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def write_m2m100_tokenizer(directory: Path, vocab_size: int = 320, seed: int = 0):
    """M2M100Tokenizer (sentencepiece, slow): vocab.json with fairseq's first four ids, the
    spm model, `__en__`-style codes after the vocab (added by the tokenizer itself)."""
    from transformers import M2M100Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    proto = train_spm("mixed", vocab_size, "bpe", seed)
    (directory / "sentencepiece.bpe.model").write_bytes(proto)
    vocab = {token: i for i, token in enumerate(NLLB_SPECIALS)}
    for piece in _pieces(proto):
        vocab.setdefault(piece, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1))
    tokenizer = M2M100Tokenizer(
        vocab_file=str(directory / "vocab.json"),
        spm_file=str(directory / "sentencepiece.bpe.model"),
        src_lang="en",
        tgt_lang="de",
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


@torch.no_grad()
def _peaked_weights(
    model,
    eos: int,
    pad: int | None,
    seed: int,
    eos_boost: float,
    logit_scale: float = 4.0,
    embed_gain: float = 3.0,
    cross_gain: float = 2.0,
) -> None:
    """Re-draw a fresh model's weights so that greedy and beam search have clear winners
    and the output depends on both the source and the target prefix.

    Embeddings (tied with the LM head) N(0, embed_gain^2/d_model): the token outweighs the
    sinusoidal position in the layers' input (else every step's output is the same).
    Linear layers N(0, 1/fan_in); the cross-attention output projection `cross_gain` times
    that, so that the source matters. Layer norms get random gains around 1 and small biases;
    the decoder's last norm zero-mean gains (a positive gain would make a tied LM head
    echo the input token) sized so that logits are ~N(0, logit_scale), plus a bias along
    E[eos] that adds `eos_boost` to the EOS logit (noise of std ~eos_boost/sqrt(d_model)
    to the others). A random `final_logits_bias` where the model has one (Marian), so that
    loading it is tested. Tuned on the default shapes: about half of greedy generations end
    with EOS within 30 tokens (tests/test_tiny_seq2seq.py checks some do).
    """
    g = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(mean + torch.randn(t.shape, generator=g) * std)

    embed = model.get_input_embeddings().weight
    normal(embed, embed_gain * embed.shape[1] ** -0.5)
    if pad is not None:
        embed[pad].zero_()  # nn.Embedding(padding_idx=pad); Marian's decoder starts from it
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            gain = cross_gain if name.endswith("encoder_attn.out_proj") else 1.0
            normal(module.weight, gain * module.in_features**-0.5)
            if module.bias is not None:
                normal(module.bias, 0.1)
        elif isinstance(module, torch.nn.LayerNorm):
            normal(module.weight, 0.2, mean=1.0)
            normal(module.bias, 0.1)
    if hasattr(model, "final_logits_bias"):
        normal(model.final_logits_bias, 0.5)
    decoder = model.get_decoder()
    final_norm = getattr(decoder, "layer_norm", None)  # pre-LN (M2M100): the decoder's last
    if final_norm is None:  # post-LN (Marian): the last layer's output norm
        final_norm = decoder.layers[-1].final_layer_norm
    normal(final_norm.weight, logit_scale / embed_gain)
    direction = embed[eos] / embed[eos].norm()
    final_norm.bias.add_(eos_boost / embed[eos].norm() * direction)


def build_marian(
    directory: Path | str,
    seed: int = 0,
    eos_boost: float = 5.0,
    spm_vocab_size: int = 256,
    **overrides,
) -> Path:
    """Save a tiny MarianMTModel with its MarianTokenizer to `directory`; return the path.
    `overrides` replace MarianConfig fields (d_model, layers, ...)."""
    from transformers import GenerationConfig, MarianConfig, MarianMTModel

    directory = Path(directory)
    tokenizer = write_marian_tokenizer(directory, spm_vocab_size, seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = MarianConfig(
        **{
            "vocab_size": len(tokenizer),
            "decoder_vocab_size": len(tokenizer),
            "d_model": 64,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 128,
            "activation_function": "swish",
            "scale_embedding": True,
            "share_encoder_decoder_embeddings": True,
            "tie_word_embeddings": True,
            "max_position_embeddings": 128,
            "pad_token_id": pad,
            "eos_token_id": eos,
            "decoder_start_token_id": pad,
            "forced_eos_token_id": None,  # OPUS-MT has 0; see the module docstring
            "dropout": 0.0,
            "architectures": ["MarianMTModel"],
            **overrides,
        }
    )
    torch.manual_seed(seed)
    model = MarianMTModel(config).eval()
    _peaked_weights(model, eos, pad, seed, eos_boost)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=pad, eos_token_id=eos, pad_token_id=pad, max_length=512
    )
    model.save_pretrained(directory)
    return directory


def build_m2m100(
    directory: Path | str,
    nllb: bool = True,
    seed: int = 0,
    eos_boost: float = 12.5,
    spm_vocab_size: int = 320,
    **overrides,
) -> Path:
    """Save a tiny M2M100ForConditionalGeneration with an NLLB tokenizer (or, `nllb=False`,
    M2M100's own) to `directory`; return the path. The model's vocab covers the tokenizer's
    (M2M100 also keeps room for the tokenizer's 8 made-up words, as m2m100_418M does)."""
    from transformers import GenerationConfig, M2M100Config, M2M100ForConditionalGeneration

    directory = Path(directory)
    if nllb:
        tokenizer = write_nllb_tokenizer(directory, spm_vocab_size, seed)
        vocab_size = len(tokenizer)
    else:
        tokenizer = write_m2m100_tokenizer(directory, spm_vocab_size, seed)
        # vocab.json, then the language codes, then the made-up words (m2m100_418M: 128112)
        codes = len(tokenizer.lang_token_to_id)
        vocab_size = len(tokenizer.encoder) + codes + tokenizer.num_madeup_words
    bos, pad, eos = tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id
    assert (bos, pad, eos) == (0, 1, 2), (bos, pad, eos)
    config = M2M100Config(
        **{
            "vocab_size": vocab_size,
            "d_model": 64,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 128,
            "activation_function": "relu",
            "scale_embedding": True,
            "tie_word_embeddings": True,
            "max_position_embeddings": 128,
            "bos_token_id": bos,
            "pad_token_id": pad,
            "eos_token_id": eos,
            "decoder_start_token_id": eos,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "encoder_layerdrop": 0.0,
            "decoder_layerdrop": 0.0,
            "architectures": ["M2M100ForConditionalGeneration"],
            **overrides,
        }
    )
    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(config).eval()
    _peaked_weights(model, eos, pad, seed, eos_boost)
    model.generation_config = GenerationConfig(
        bos_token_id=bos,
        decoder_start_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
        max_length=200,
    )
    model.save_pretrained(directory)
    return directory
