"""Encoder-decoder translation throughput: our engine, transformers.generate and CTranslate2.

    python -m pipeline.bench.seq2seq                      # 64 sentences: ~9 min on 2 cores
    python -m pipeline.bench.seq2seq --num-sentences 512  # issue 10's workload (~1.5 h there)
    python -m pipeline.bench.seq2seq --quick              # 16 sentences, a smoke run
    python -m pipeline.bench.seq2seq --systems hf,ct2_float32 --modes greedy

The model: random weights with the OPUS-MT en-de shape (MarianMTModel: d_model 512, 6+6
layers, 8 heads, FFN 2048, swish, scaled and tied embeddings, decoder starting from <pad>)
and a MarianTokenizer whose source.spm / target.spm are SentencePiece BPE models trained
here: English on the docstrings of Python's standard library, the target side on a
German-looking rewrite of the same text, their joint vocab.json sized to OPUS-MT's 58101
entries where the corpus allows it. Built once into --model-dir and reused.

The workload: --num-sentences sources (issue 10: 512) of 5 to 120 tokens (log-uniform
lengths, ending in </s>, as MarianTokenizer makes them), each translated to exactly
--new-tokens tokens (default 64) greedily and with beam 4: every system is forced to the
same length (transformers min_new_tokens = max_new_tokens, CTranslate2 min/max decoding
length, ours min_tokens = max_tokens) and the bench checks every output's length.

Systems (--systems), each in this process, one after another:
  hf           transformers.generate, length-sorted batches of --hf-batch (32), float32
  ct2_float32  CTranslate2 converted from the same directory, compute_type float32
  ct2_int8     the same converted model loaded with compute_type int8
  ours         LLMEngine, once per --dtypes entry (float32; bfloat16 where the CPU has
               bf16 dot products, or when asked for)
CTranslate2's max_batch_size / batch_type is tuned per mode and compute type: every
candidate (--ct2-batches) is timed, on the whole set when it has at most
--ct2-tune-sentences (128) sources (its best time is the result), else on that many
sources spread over it, the best one then running the whole set. Ours is tuned the same
way per mode and dtype over --max-num-seqs (256,512,1,024 decoder rows in a step), on
--ours-tune-sentences (256: with fewer, a beam-4 subset cannot fill 1,024 rows). Threads:
torch.set_num_threads and CTranslate2's intra_threads = --threads (default: all cores).

Reported per system and mode: wall seconds, tokens/s (sentences x new tokens: the returned
hypothesis, not every beam), the ratio to CTranslate2 float32 and int8 in the same mode,
and the fraction of the compute floor: the workload's matmul FLOPs (encoder once per
source, cross-attention K/V once per source, decoder layers + attention + LM head per
decoder row and step, 4 rows per source in beam 4) over a matmul peak measured in this
run with torch.mm of the model's shapes (per dtype; int8 is set against the float32 peak).
A markdown table is printed and everything goes to --out as JSON.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import platform
import random
import re
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Helsinki-NLP/opus-mt-en-de's architecture; vocab_size comes from the trained tokenizer.
SHAPE: dict[str, Any] = dict(
    d_model=512,
    encoder_layers=6,
    decoder_layers=6,
    encoder_attention_heads=8,
    decoder_attention_heads=8,
    encoder_ffn_dim=2048,
    decoder_ffn_dim=2048,
    activation_function="swish",
    scale_embedding=True,
    share_encoder_decoder_embeddings=True,
    tie_word_embeddings=True,
    max_position_embeddings=512,
)
OPUS_MT_VOCAB = 58101  # opus-mt-en-de: 2 x 32k SentencePiece pieces, joint vocab.json
SPM_PIECES = 32000
MODES = {"greedy": 1, "beam4": 4}  # mode -> decoder rows per source
ALL_SYSTEMS = ("hf", "ct2_float32", "ct2_int8", "ours")
DEFAULT_CT2_BATCHES = "examples:16,examples:32,examples:64,tokens:2048"


# --- the corpus and the tokenizer --------------------------------------------------------


def stdlib_docstrings() -> list[str]:
    """English text available offline: the docstrings of the standard library, one
    sentence or paragraph a line, in a fixed order (sorted files, AST walk order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    lines = re.split(r"\n\s*\n|(?<=[.!?])\s+", "\n".join(texts))
    lines = [re.sub(r"\s+", " ", line).strip() for line in lines]
    return [line for line in lines if len(line.split()) >= 3]


_GERMANISH = {
    "tion": "tung",
    "ing": "ung",
    "th": "d",
    "sh": "sch",
    "ee": "ie",
    "oo": "u",
    "ou": "au",
    "qu": "kw",
    "ph": "f",
    "c": "k",
    "w": "v",
    "y": "j",
    "x": "ks",
    "z": "tz",
}
_GERMANISH_RE = re.compile("|".join(sorted(map(re.escape, _GERMANISH), key=len, reverse=True)))


def germanish(line: str) -> str:
    """A deterministic German-looking rewrite (spelling rules, -en endings on some long
    words): a target side whose pieces differ from the source's, as a real pair's do."""
    text = _GERMANISH_RE.sub(lambda m: _GERMANISH[m.group(0)], line)
    words = [
        w + "en" if len(w) > 6 and w.isalpha() and zlib.crc32(w.encode()) % 2 else w
        for w in text.split()
    ]
    return " ".join(words)


def train_bpe(lines: list[str], vocab_size: int) -> bytes:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        hard_vocab_limit=False,
        max_sentence_length=16384,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return model.getvalue()


def _pieces(proto: bytes) -> list[str]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto)
    return [
        sp.id_to_piece(i)
        for i in range(sp.get_piece_size())
        if not (sp.is_unknown(i) or sp.is_control(i))
    ]


def _joint_vocab(source: bytes, target: bytes) -> dict[str, int]:
    """OPUS-MT's vocab.json layout: </s> 0, <unk> 1, both models' pieces, <pad> last."""
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in _pieces(source) + _pieces(target):
        vocab.setdefault(piece, len(vocab))
    vocab["<pad>"] = len(vocab)
    return vocab


def build_tokenizer(directory: Path, lines: list[str]) -> int:
    """source.spm (32k pieces), target.spm (as many pieces as keep the joint vocab within
    OPUS-MT's 58101, found by bisection: the two sides share many pieces) and vocab.json.
    Returns the vocab size."""
    source = train_bpe(lines, SPM_PIECES)
    target_lines = [germanish(line) for line in lines]
    low, high = 1000, OPUS_MT_VOCAB
    best = train_bpe(target_lines, low)
    while low < high:  # the largest target model whose joint vocab fits
        middle = (low + high + 1) // 2
        target = train_bpe(target_lines, middle)
        if len(_joint_vocab(source, target)) <= OPUS_MT_VOCAB:
            low, best = middle, target
        else:
            high = middle - 1
    vocab = _joint_vocab(source, best)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "source.spm").write_bytes(source)
    (directory / "target.spm").write_bytes(best)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    return len(vocab)


def build_model(directory: Path, seed: int = 0) -> Path:
    """The tokenizer, random float32 weights of the OPUS-MT shape and a generation config
    without OPUS-MT's bad_words_ids / forced_eos_token_id (every system generates exactly
    --new-tokens tokens anyway), and corpus.txt, the text sources are drawn from. Reused
    when `directory` already holds a model and a corpus.txt (any Marian model will do)."""
    if (directory / "model.safetensors").exists() and (directory / "corpus.txt").exists():
        return directory
    from transformers import GenerationConfig, MarianConfig, MarianMTModel, MarianTokenizer

    started = time.perf_counter()
    lines = stdlib_docstrings()
    vocab_size = build_tokenizer(directory, lines)
    tokenizer = MarianTokenizer(
        source_spm=str(directory / "source.spm"),
        target_spm=str(directory / "target.spm"),
        vocab=str(directory / "vocab.json"),
        source_lang="en",
        target_lang="de",
    )
    tokenizer.save_pretrained(directory)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = MarianConfig(
        **SHAPE,
        vocab_size=vocab_size,
        decoder_vocab_size=vocab_size,
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=pad,
        forced_eos_token_id=None,
        architectures=["MarianMTModel"],
    )
    torch.manual_seed(seed)
    model = MarianMTModel(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=pad, eos_token_id=eos, pad_token_id=pad, max_length=512
    )
    model.save_pretrained(directory)
    (directory / "corpus.txt").write_text("\n".join(lines))  # last: marks the build done
    log.info("built %s in %.0fs (vocab %d)", directory, time.perf_counter() - started, vocab_size)
    return directory


def make_sources(
    tokenizer, lines: list[str], count: int, low: int, high: int, seed: int = 0
) -> list[list[int]]:
    """`count` sources of `low`..`high` tokens (</s> included), lengths log-uniform: runs
    of corpus words from a random place on, as many as fit the drawn length, tokenized by
    the Marian tokenizer. (SentencePiece splits at spaces, so a text's pieces are its
    words' pieces: lengths are counted word by word with the source model.)"""
    rng = random.Random(seed)
    words = " ".join(lines).split()
    spm = tokenizer.spm_source
    sources = []
    for _ in range(count):
        target = round(math.exp(rng.uniform(math.log(low), math.log(high))))
        start = rng.randrange(len(words) - 1000)
        taken: list[str] = []
        length = 1  # </s>
        for word in words[start : start + 1000]:
            pieces = len(spm.encode(word))
            if length + pieces > target and length >= low:
                break
            taken.append(word)
            length += pieces
        ids = tokenizer(" ".join(taken)).input_ids
        sources.append(ids[: high - 1] + [tokenizer.eos_token_id] if len(ids) > high else ids)
    return sources


# --- the compute floor --------------------------------------------------------------------


def workload_flops(
    source_lens: list[int], new_tokens: int, rows: int, vocab: int, shape: dict | None = None
) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of the least work a system must do: the encoder
    once per source (projections, FFN, attention), the cross-attention K/V projections once
    per source, and per decoder row and step (the start token and the fed-back tokens,
    `new_tokens` steps) the self- and cross-attention projections, the FFN, attention over
    the decoder prefix and the source, and the LM head over the whole vocab."""
    s = shape or SHAPE
    d, f = s["d_model"], s["encoder_ffn_dim"]
    le, ld = s["encoder_layers"], s["decoder_layers"]
    t = new_tokens
    out = {"encoder": 0.0, "cross_kv": 0.0, "decoder": 0.0, "lm_head": 0.0}
    for n in source_lens:
        out["encoder"] += le * (n * (4 * d * d + 2 * d * f) + 2 * n * n * d)
        out["cross_kv"] += ld * n * 2 * d * d
        layers = t * (6 * d * d + 2 * d * f) + 2 * d * (t * (t + 1) / 2) + 2 * d * n * t
        out["decoder"] += rows * ld * layers
        out["lm_head"] += rows * t * d * vocab
    out = {key: 2 * value for key, value in out.items()}
    out["total"] = sum(out.values())
    return out


def matmul_peak(dtype: torch.dtype, repeats: int = 10) -> float:
    """Best FLOP/s of torch.mm at this model's shapes (256 rows x 512 -> 2048, 2048 -> 512,
    512 -> 512), the weight stored [out, in] as in nn.Linear, on this machine now: the
    floor's denominator. (bf16 on a CPU without bf16 dot products has a fast path for
    this layout only: torch.mm(a, b) with b [in, out] runs ~15x slower there.)"""
    best = 0.0
    for m, k, n in ((256, 512, 2048), (256, 2048, 512), (256, 512, 512)):
        a, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
        torch.mm(a, w.t())
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, w.t())
            best = max(best, 2 * m * k * n / (time.perf_counter() - started))
    return best


# --- the systems --------------------------------------------------------------------------


def check_lengths(system: str, lengths: list[int], new_tokens: int) -> None:
    wrong = [n for n in lengths if n != new_tokens]
    if wrong:
        raise RuntimeError(
            f"{system}: {len(wrong)} outputs are not {new_tokens} tokens long, e.g. {wrong[:5]}"
        )


@torch.inference_mode()
def run_hf(model, sources, rows: int, new_tokens: int, batch: int, pad: int) -> float:
    """transformers.generate over length-sorted batches; checks each output's length."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    lengths = []
    started = time.perf_counter()
    for first in range(0, len(order), batch):
        chunk = [sources[i] for i in order[first : first + batch]]
        width = max(map(len, chunk))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            num_beams=rows,
            do_sample=False,
        )
        lengths += [out.shape[1] - 1] * len(chunk)  # minus the decoder start token
    seconds = time.perf_counter() - started
    check_lengths("hf", lengths, new_tokens)
    return seconds


def convert_ct2(model_dir: Path) -> Path:
    out = model_dir / "ct2"
    if not (out / "model.bin").exists():
        import ctranslate2

        ctranslate2.converters.TransformersConverter(str(model_dir)).convert(str(out), force=True)
    return out


def run_ct2(translator, tokens, rows: int, new_tokens: int, batch_type: str, size: int) -> float:
    started = time.perf_counter()
    results = translator.translate_batch(
        tokens,
        max_batch_size=size,
        batch_type=batch_type,
        beam_size=rows,
        min_decoding_length=new_tokens,
        max_decoding_length=new_tokens,
    )
    seconds = time.perf_counter() - started
    # hypotheses hold the generated tokens only: no decoder start token, no </s> (never
    # generated before min_decoding_length, and not returned at the end)
    check_lengths("ct2", [len(r.hypotheses[0]) for r in results], new_tokens)
    return seconds


def spread(items: list, count: int) -> list:
    """`count` of `items` taken evenly over the list (all of them when it is no longer)."""
    step = max(len(items) // count, 1)
    return items[::step][:count]


def tune_ct2(translator, tokens, rows, new_tokens, candidates, tune_n) -> tuple[tuple, dict]:
    """Time each (batch_type, max_batch_size) candidate; return the best and every
    candidate's seconds. On the whole set when it has at most `tune_n` sources (the best
    time is then the measurement), else on `tune_n` sources spread evenly over it."""
    subset = spread(tokens, tune_n)
    timings = {}
    for batch_type, size in candidates:
        timings[f"{batch_type}:{size}"] = run_ct2(
            translator, subset, rows, new_tokens, batch_type, size
        )
    best = min(candidates, key=lambda c: timings[f"{c[0]}:{c[1]}"])
    return best, timings


def run_ours(engine, sources, rows: int, new_tokens: int) -> float:
    from pipeline.engine.params import BeamParams, SamplingParams

    params: SamplingParams | BeamParams
    if rows == 1:
        params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens)
    else:
        params = BeamParams(width=rows, max_tokens=new_tokens, min_tokens=new_tokens)
    started = time.perf_counter()
    outputs = engine.generate(sources, params)
    seconds = time.perf_counter() - started
    errors = [o.error for o in outputs if o.error]
    if errors:
        raise RuntimeError(f"ours: {len(errors)} requests failed, e.g. {errors[0]}")
    check_lengths("ours", [len(o.outputs[0].token_ids) for o in outputs], new_tokens)
    return seconds


# --- the run ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS))
    p.add_argument(
        "--dtypes",
        default="auto",
        help="ours: one engine each; auto: float32, and bfloat16 where the CPU has bf16 dot "
        "products (avx512_bf16 / amx_bf16; elsewhere torch emulates it, several times slower)",
    )
    p.add_argument("--modes", default="greedy,beam4")
    p.add_argument("--num-sentences", type=int, default=64, help="the issue's run: 512")
    p.add_argument("--min-len", type=int, default=5)
    p.add_argument("--max-len", type=int, default=120)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="16 sentences, 1 candidate each")
    p.add_argument("--threads", type=int, default=0, help="0: all cores")
    p.add_argument(
        "--repeats", type=int, default=1, help="time each system and mode N times, keep the best"
    )
    p.add_argument("--hf-batch", type=int, default=32)
    p.add_argument("--ct2-batches", default=DEFAULT_CT2_BATCHES)
    p.add_argument("--ct2-tune-sentences", type=int, default=128)
    p.add_argument("--max-num-seqs", default="256,512,1024", help="ours: the candidates tuned over")
    p.add_argument("--ours-tune-sentences", type=int, default=256)
    p.add_argument("--kv-cache-memory", default="4GiB", help="ours (1,024 fp32 beams fit)")
    p.add_argument("--model-dir", type=Path, default=Path("outputs/bench_models/opus_mt_shape"))
    p.add_argument("--out", type=Path, default=Path("outputs/bench_seq2seq.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.num_sentences = min(args.num_sentences, 16)
        args.ct2_batches = "examples:32"
        args.max_num_seqs = "256"
    if args.dtypes == "auto":
        args.dtypes = "float32,bfloat16" if cpu_has_bf16() else "float32"
    unknown = set(args.systems.split(",")) - set(ALL_SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {ALL_SYSTEMS}")
    return args


def best_of(repeats: int, timed: Callable[..., float], *args) -> float:
    return min(timed(*args) for _ in range(max(repeats, 1)))


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _row(system: str, dtype: str, mode: str, seconds: float, setting: str) -> dict:
    return {"system": system, "dtype": dtype, "mode": mode, "wall_s": seconds, "batch": setting}


def run_system(
    name: str,
    args: argparse.Namespace,
    model_dir: Path,
    sources: list[list[int]],
    modes: list[str],
    emit: Callable[[dict], None],
) -> None:
    """Load one system, run every mode, emit a row per (dtype, mode)."""
    new = args.new_tokens
    if name == "hf":
        from transformers import AutoModelForSeq2SeqLM

        model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        pad = model.config.pad_token_id
        for mode in modes:
            seconds = best_of(
                args.repeats, run_hf, model, sources, MODES[mode], new, args.hf_batch, pad
            )
            emit(_row("hf", "float32", mode, seconds, f"sorted batches of {args.hf_batch}"))
    elif name.startswith("ct2_"):
        import ctranslate2
        from transformers import AutoTokenizer

        compute = name.removeprefix("ct2_")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokens = [tokenizer.convert_ids_to_tokens(s) for s in sources]
        translator = ctranslate2.Translator(
            str(convert_ct2(model_dir)),
            device="cpu",
            compute_type=compute,
            intra_threads=args.threads,
            inter_threads=1,
        )
        candidates = [(c.split(":")[0], int(c.split(":")[1])) for c in args.ct2_batches.split(",")]
        for mode in modes:
            rows = MODES[mode]
            best, timings = tune_ct2(
                translator, tokens, rows, new, candidates, args.ct2_tune_sentences
            )
            if len(tokens) <= args.ct2_tune_sentences:
                seconds = timings[f"{best[0]}:{best[1]}"]
            else:
                seconds = best_of(args.repeats, run_ct2, translator, tokens, rows, new, *best)
            row = _row(name, compute, mode, seconds, f"{best[0]}:{best[1]}")
            emit(row | {"ct2_tuning_s": timings})
    elif name == "ours":
        sizes = [int(size) for size in str(args.max_num_seqs).split(",")]
        for dtype in args.dtypes.split(","):
            for mode in modes:
                size, timings = tune_ours(args, model_dir, dtype, sources, mode, sizes)
                if len(sources) <= args.ours_tune_sentences:
                    seconds = timings[str(size)]
                else:
                    engine = ours_engine(args, model_dir, dtype, size)
                    seconds = best_of(args.repeats, run_ours, engine, sources, MODES[mode], new)
                    del engine
                row = _row("ours", dtype, mode, seconds, f"max_num_seqs {size}")
                emit(row | {"ours_tuning_s": timings})


def ours_engine(args: argparse.Namespace, model_dir: Path, dtype: str, max_num_seqs: int):
    from pipeline.engine.config import EngineConfig, ModelConfig
    from pipeline.engine.engine import LLMEngine

    config = EngineConfig(
        device="cpu",
        dtype=dtype,
        max_num_seqs=max_num_seqs,
        kv_cache_memory=args.kv_cache_memory,
        num_threads=args.threads,
    )
    return LLMEngine.from_config(ModelConfig(path=str(model_dir)), config)


def tune_ours(
    args: argparse.Namespace,
    model_dir: Path,
    dtype: str,
    sources: list[list[int]],
    mode: str,
    sizes: list[int],
) -> tuple[int, dict]:
    """Time each max_num_seqs candidate on --ours-tune-sentences sources spread over the
    set (all of them when it is no larger: the best time is then the measurement); return
    the best and every candidate's seconds."""
    subset = spread(sources, args.ours_tune_sentences)
    timings = {}
    for size in sizes:
        engine = ours_engine(args, model_dir, dtype, size)
        timings[str(size)] = run_ours(engine, subset, MODES[mode], args.new_tokens)
        del engine
    return min(sizes, key=lambda size: timings[str(size)]), timings


def add_ratios(rows: list[dict], tokens: int, flops: dict, peaks: dict) -> None:
    """tokens/s, ratios to CTranslate2 float32 and int8 in the same mode, floor fraction."""
    for row in rows:
        row["tok_s"] = tokens / row["wall_s"]
        for ref in ("ct2_float32", "ct2_int8"):
            base = next((r for r in rows if r["system"] == ref and r["mode"] == row["mode"]), None)
            row[f"vs_{ref}"] = base["wall_s"] / row["wall_s"] if base else None
        peak = peaks.get(row["dtype"], peaks["float32"])
        row["floor_s"] = flops[row["mode"]]["total"] / peak
        row["floor_frac"] = row["floor_s"] / row["wall_s"]


def markdown(rows: list[dict]) -> str:
    def ratio(value: float | None) -> str:
        return f"{value:.2f}x" if value is not None else "-"

    lines = [
        "| system | dtype | mode | wall s | tokens/s | vs CT2 fp32 | vs CT2 int8 | floor | batch |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['dtype']} | {r['mode']} | {r['wall_s']:.1f} | "
            f"{r['tok_s']:.0f} | {ratio(r['vs_ct2_float32'])} | {ratio(r['vs_ct2_int8'])} | "
            f"{100 * r['floor_frac']:.0f}% | {r['batch']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    model_dir = build_model(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = (model_dir / "corpus.txt").read_text().split("\n")
    sources = make_sources(tokenizer, lines, args.num_sentences, args.min_len, args.max_len)
    lens = [len(s) for s in sources]
    modes = args.modes.split(",")
    systems = args.systems.split(",")
    dtypes = {"float32"} | (set(args.dtypes.split(",")) if "ours" in systems else set())
    peaks: dict[str, float] = {}

    def measure_peaks() -> None:  # again after each system: the best seen in the run
        for dtype in sorted(dtypes):
            peaks[dtype] = max(peaks.get(dtype, 0.0), matmul_peak(getattr(torch, dtype)))

    measure_peaks()
    config = json.loads((model_dir / "config.json").read_text())
    shape = {key: config[key] for key in SHAPE}
    vocab = config["vocab_size"]
    flops = {m: workload_flops(lens, args.new_tokens, MODES[m], vocab, shape) for m in modes}
    name = "OPUS-MT en-de shape" if shape == SHAPE else str(model_dir)
    header = (
        f"# {name} (vocab {vocab}), {len(sources)} sources of {min(lens)}-"
        f"{max(lens)} tokens (mean {sum(lens) / len(lens):.1f}) x {args.new_tokens} new "
        f"tokens, {args.threads} threads on {platform.processor() or platform.machine()}; "
        "matmul peak (now) "
        + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items())
        + "; floor "
        + ", ".join(f"{m} {f['total'] / 1e12:.2f} TFLOP" for m, f in flops.items())
    )
    print(header, flush=True)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(
            f"  {row['system']} {row['dtype']} {row['mode']}: {row['wall_s']:.1f} s "
            f"({len(sources) * args.new_tokens / row['wall_s']:.0f} tok/s, {row['batch']})",
            flush=True,
        )

    for name in systems:
        run_system(name, args, model_dir, sources, modes, emit)
        measure_peaks()
    print("# matmul peak " + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))
    add_ratios(rows, len(sources) * args.new_tokens, flops, peaks)
    print(markdown(rows))
    import transformers

    result = {
        "command": "python -m pipeline.bench.seq2seq "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "model_dir": str(model_dir),
        "shape": shape,
        "vocab_size": vocab,
        "sentences": len(sources),
        "source_tokens": {"min": min(lens), "max": max(lens), "mean": sum(lens) / len(lens)},
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "ctranslate2": _version("ctranslate2"),
            "python": platform.python_version(),
        },
        "matmul_peak_gflops": {d: p / 1e9 for d, p in peaks.items()},
        "floor_gflop": {m: {k: v / 1e9 for k, v in f.items()} for m, f in flops.items()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
