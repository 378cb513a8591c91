"""Language names and codes for multilingual translation models (NLLB, M2M100).

`task.source_lang` / `task.target_lang` accept a plain name ("German"), an ISO 639-1 code
("de") or the model's own code ("deu_Latn" for NLLB, "de" for M2M100). NLLB tokenizers set
the source language with `src_lang` and take the target language as the decoder's forced
first token; M2M100 does the same with `__de__` tokens. Marian (OPUS-MT) models serve one
language pair and have no codes: the languages are then only labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.engine.config import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# name -> (ISO 639-1, NLLB code); the languages most batch translation jobs ask for.
LANGUAGES = {
    "arabic": ("ar", "arb_Arab"),
    "bengali": ("bn", "ben_Beng"),
    "bulgarian": ("bg", "bul_Cyrl"),
    "catalan": ("ca", "cat_Latn"),
    "chinese": ("zh", "zho_Hans"),
    "croatian": ("hr", "hrv_Latn"),
    "czech": ("cs", "ces_Latn"),
    "danish": ("da", "dan_Latn"),
    "dutch": ("nl", "nld_Latn"),
    "english": ("en", "eng_Latn"),
    "estonian": ("et", "est_Latn"),
    "finnish": ("fi", "fin_Latn"),
    "french": ("fr", "fra_Latn"),
    "german": ("de", "deu_Latn"),
    "greek": ("el", "ell_Grek"),
    "hebrew": ("he", "heb_Hebr"),
    "hindi": ("hi", "hin_Deva"),
    "hungarian": ("hu", "hun_Latn"),
    "indonesian": ("id", "ind_Latn"),
    "italian": ("it", "ita_Latn"),
    "japanese": ("ja", "jpn_Jpan"),
    "korean": ("ko", "kor_Hang"),
    "latvian": ("lv", "lvs_Latn"),
    "lithuanian": ("lt", "lit_Latn"),
    "norwegian": ("no", "nob_Latn"),
    "persian": ("fa", "pes_Arab"),
    "polish": ("pl", "pol_Latn"),
    "portuguese": ("pt", "por_Latn"),
    "romanian": ("ro", "ron_Latn"),
    "russian": ("ru", "rus_Cyrl"),
    "serbian": ("sr", "srp_Cyrl"),
    "slovak": ("sk", "slk_Latn"),
    "slovenian": ("sl", "slv_Latn"),
    "spanish": ("es", "spa_Latn"),
    "swahili": ("sw", "swh_Latn"),
    "swedish": ("sv", "swe_Latn"),
    "tamil": ("ta", "tam_Taml"),
    "thai": ("th", "tha_Thai"),
    "turkish": ("tr", "tur_Latn"),
    "ukrainian": ("uk", "ukr_Cyrl"),
    "urdu": ("ur", "urd_Arab"),
    "vietnamese": ("vi", "vie_Latn"),
}
_BY_ISO = {iso: (iso, nllb) for iso, nllb in LANGUAGES.values()}


def has_language_codes(tokenizer: PreTrainedTokenizerBase) -> bool:
    """NLLB and M2M100 tokenizers: the source language is a tokenizer setting."""
    return hasattr(tokenizer, "src_lang")


def language_code(lang: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The code `tokenizer.src_lang` takes for `lang`: NLLB's "deu_Latn", M2M100's "de"."""
    nllb = "Nllb" in type(tokenizer).__name__
    vocab = tokenizer.get_vocab()
    known = LANGUAGES.get(lang.strip().lower()) or _BY_ISO.get(lang.strip().lower())
    candidates = [lang] + ([known[1] if nllb else known[0]] if known else [])
    for code in candidates:
        if (code if nllb else f"__{code}__") in vocab:
            return code
    raise ConfigError(
        f"language {lang!r} is not one of this model's languages: give a name "
        f"({', '.join(sorted(LANGUAGES)[:6])}, ...), an ISO 639-1 code or the model's own "
        f"code ({'eng_Latn' if nllb else 'en'}, ...)"
    )


def target_token(lang: str, tokenizer: PreTrainedTokenizerBase) -> int:
    """The decoder's forced first token for target language `lang`."""
    code = language_code(lang, tokenizer)
    nllb = "Nllb" in type(tokenizer).__name__
    token = tokenizer.convert_tokens_to_ids(code if nllb else f"__{code}__")
    assert isinstance(token, int)
    return token
