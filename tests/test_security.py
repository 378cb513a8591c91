"""Safe loading: weights from safetensors only, no code from a model directory is run."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.models.loader import load_model, read_spec
from pipeline.tokenize import _tokenizer


def test_pickled_weights_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    (model_dir / "model.safetensors").unlink()
    torch.save({"lm_head.weight": torch.zeros(1)}, model_dir / "pytorch_model.bin")
    with pytest.raises(Exception, match=r"pickled \.bin checkpoints are refused"):
        load_model(model_dir, read_spec(model_dir), torch.float32, torch.device("cpu"), 64)


def test_remote_code_in_a_model_dir_is_never_run(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    marker = tmp_path / "code_ran"
    (model_dir / "evil_tokenizer.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    config_path.write_text(json.dumps(config))
    with contextlib.suppress(Exception):  # refusing to load is fine; running the file is not
        _tokenizer(str(model_dir))  # what the tokenization workers call
    assert not marker.exists()
