"""The bundled demo model (pipeline/assets/demo_model) loads with transformers and translates.

Built by jobs/train_demo_model.py; these checks pin what the translate job and the engine rely
on: the prompt template, BOS from the tokenizer's post-processor, EOS, and held-out accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pq = pytest.importorskip("pyarrow.parquet")

ASSETS = Path(__file__).resolve().parents[1] / "pipeline" / "assets"
MODEL_DIR = ASSETS / "demo_model"
SAMPLE = ASSETS / "demo_input" / "sample.parquet"

# Byte for byte what the translate job builds (and what the model was trained on).
PROMPT_TEMPLATE = (
    "Translate from {source_lang} to {target_lang}.\n{source_lang}: {text}\n{target_lang}:"
)


def prompt(text: str) -> str:
    return PROMPT_TEMPLATE.format(source_lang="English", target_lang="German", text=text)


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model(one_thread):
    m = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def sample():
    return pq.read_table(SAMPLE).to_pylist()


def test_files_are_safetensors_and_small():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "EVAL.json",
    } <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 15_500_000
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total <= 20_000_000


def test_eval_record():
    ev = json.loads((MODEL_DIR / "EVAL.json").read_text())
    assert ev["prompt_template"] == PROMPT_TEMPLATE
    assert ev["greedy_exact_match"] >= 0.9
    assert ev["beam4_exact_match"] >= ev["greedy_exact_match"]


def test_sample_input(sample):
    assert len(sample) >= 200
    assert set(sample[0]) == {"id", "text", "reference"}
    assert all(isinstance(r["id"], str) and r["text"] and r["reference"] for r in sample)
    assert len({r["id"] for r in sample}) == len(sample)


def test_tokenizer_special_tokens_and_template(tok, model):
    cfg = model.config
    assert tok.chat_template is None
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert cfg.bos_token_id == tok.bos_token_id
    assert cfg.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    assert cfg.pad_token_id == tok.pad_token_id

    p = prompt("three hundred and forty-two thousand, five hundred and sixty-seven")
    ids = tok(p).input_ids  # add_special_tokens=True: the post-processor prepends <s>
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    assert tok(p, add_special_tokens=False).input_ids == ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == p
    assert tok.decode(ids) == "<s>" + p
    # Prompt and answer tokenize independently: the answer's leading space stays with it.
    answer = " dreihundertzweiundvierzigtausendfünfhundertsiebenundsechzig"
    a = tok(answer, add_special_tokens=False).input_ids
    assert tok(p + answer).input_ids == ids + a
    assert tok.decode([*a, tok.eos_token_id], skip_special_tokens=True) == answer


def test_greedy_translates_sample_rows(tok, model, sample):
    rows = sample[:: max(1, len(sample) // 10)][:10]
    enc = tok([prompt(r["text"]) for r in rows], return_tensors="pt", padding=True)
    assert tok.padding_side == "left"
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=40)
    hyps = tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    good = sum(h == " " + r["reference"] for h, r in zip(hyps, rows, strict=True))
    assert good >= 8, list(zip(hyps, [r["reference"] for r in rows], strict=True))
