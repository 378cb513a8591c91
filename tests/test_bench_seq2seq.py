"""pipeline.bench.seq2seq end to end on a tiny Marian model: every system generates exactly
the asked number of tokens, the report has a row per system and mode, ratios and floors."""

from __future__ import annotations

import json

import pytest
from tiny_seq2seq import EN_WORDS, build_marian, corpus

from pipeline.bench import seq2seq


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = build_marian(tmp_path_factory.mktemp("bench_marian"))
    (directory / "corpus.txt").write_text("\n".join(corpus(EN_WORDS, 200, seed=1)))
    return directory


def run(model_dir, out, systems: str) -> dict:
    argv = ["--systems", systems, "--modes", "greedy,beam4", "--num-sentences", "6"]
    argv += ["--new-tokens", "5", "--max-len", "24", "--dtypes", "float32"]
    argv += ["--ct2-batches", "examples:4,tokens:64", "--model-dir", str(model_dir)]
    argv += ["--max-num-seqs", "4,8", "--ours-tune-sentences", "3"]  # tuned on 3, run on 6
    result = seq2seq.main([*argv, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    return result


def test_hf_and_ours(model_dir, tmp_path) -> None:
    result = run(model_dir, tmp_path / "bench.json", "hf,ours")
    assert result["sentences"] == 6 and result["source_tokens"]["min"] >= 5
    assert result["source_tokens"]["max"] <= 24
    rows = {(r["system"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(s, m) for s in ("hf", "ours") for m in ("greedy", "beam4")}
    for row in rows.values():
        assert row["tok_s"] == pytest.approx(6 * 5 / row["wall_s"])
        assert row["floor_frac"] > 0 and row["vs_ct2_float32"] is None
    for mode in ("greedy", "beam4"):  # the best candidate on the subset ran the whole set
        tuning = rows["ours", mode]["ours_tuning_s"]
        assert set(tuning) == {"4", "8"}
        assert rows["ours", mode]["batch"] == f"max_num_seqs {min(tuning, key=tuning.get)}"
    floor = result["floor_gflop"]
    assert floor["beam4"]["decoder"] == pytest.approx(4 * floor["greedy"]["decoder"])
    assert floor["beam4"]["encoder"] == floor["greedy"]["encoder"]


def test_ctranslate2(model_dir, tmp_path) -> None:
    pytest.importorskip("ctranslate2")
    result = run(model_dir, tmp_path / "bench.json", "ct2_float32,ct2_int8")
    rows = {(r["system"], r["mode"]): r for r in result["rows"]}
    assert rows["ct2_float32", "greedy"]["vs_ct2_float32"] == 1.0
    assert set(rows["ct2_int8", "beam4"]["ct2_tuning_s"]) == {"examples:4", "tokens:64"}


def test_flops_by_hand() -> None:
    shape = dict(seq2seq.SHAPE, d_model=2, encoder_ffn_dim=3, encoder_layers=1, decoder_layers=1)
    flops = seq2seq.workload_flops([2], new_tokens=1, rows=1, vocab=5, shape=shape)
    # encoder: 2 tokens x (4*2*2 + 2*2*3) + QK/PV 2*2*2*2; cross K/V: 2 tokens x 2*2*2
    assert flops["encoder"] == 2 * (2 * (16 + 12) + 16)
    assert flops["cross_kv"] == 2 * 16
    # one step: 6*2*2 + 2*2*3 projections/FFN, self-attention over 1, cross over 2; head 2*5
    assert flops["decoder"] == 2 * (24 + 12 + 2 * 2 * 1 + 2 * 2 * 2)
    assert flops["lm_head"] == 2 * 10
