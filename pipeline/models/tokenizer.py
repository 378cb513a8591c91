"""The model's tokenizer, loaded the cheap way when the checkpoint allows it.

`AutoTokenizer` resolves the tokenizer class through transformers' model registry, whose first
use imports the registry's package and scans every model's module for its exports: ~1-2 s per
process on a 2-core CPU, paid by the engine and by every tokenization worker. A checkpoint
whose tokenizer is a plain `tokenizers` one (`tokenizer_class` PreTrainedTokenizerFast: Llama
3, the bundled demo model; TokenizersBackend, its name since transformers 5) names the class
itself: it is built directly, the same object `AutoTokenizer` returns. Every other checkpoint
(model-specific classes such as Marian's or NLLB's, with their own behaviour) goes through
`AutoTokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_PLAIN = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    if _tokenizer_class(Path(model_dir)) in _PLAIN:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)


def _tokenizer_class(model_dir: Path) -> str | None:
    """`tokenizer_class` from tokenizer_config.json, when it and tokenizer.json are there."""
    config = model_dir / "tokenizer_config.json"
    if not config.is_file() or not (model_dir / "tokenizer.json").is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None  # AutoTokenizer reports what is wrong with it
    return value if isinstance(value, str) else None
