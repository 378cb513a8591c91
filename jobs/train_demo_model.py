"""Rebuild the bundled demo model: a tiny Llama that translates English number words.

    python jobs/train_demo_model.py --out pipeline/assets/demo_model

The task is synthetic and exact: English number words (``num2words(n, lang="en")``, numbers
0..999,999) to German and French number words (``--langs de,fr``, the default; ``--langs de``
trains German alone). It is small enough to train from scratch on one CPU thread in about twelve
minutes, and exact enough that a wrong token shows up as a wrong row, which makes it a good
end-to-end check of the pipeline's own engine (greedy, beams, batching).

Training stops on a time budget (``--time-budget``, 660 s, after a ~30 s first step that
compiles), so a slower CPU trains fewer steps; the shipped model took 3,377 steps of 64 rows on
one Sapphire Rapids core (bf16 autocast, ``torch.compile``). For a run that does not depend on
the machine, pass ``--time-budget 1e9 --max-steps 3400``.

What the recipe writes:

* ``<out>/``: ``model.safetensors``, ``config.json``, ``generation_config.json`` (a
  ``LlamaForCausalLM``), ``tokenizer.json``, ``tokenizer_config.json``,
  ``special_tokens_map.json`` (a byte-level BPE trained here), ``EVAL.json`` (held-out exact
  match, greedy and 4-beam, with ``transformers.generate``) and a short ``README.md``.
* ``<sample-out>/sample.parquet``: 256 held-out rows (``id``, ``text``, ``reference``) for the
  default translate job, and a ``README.md``.

Prompt (byte for byte what ``pipeline``'s translate job builds)::

    "Translate from {source_lang} to {target_lang}.\\n{source_lang}: {text}\\n{target_lang}:"

The tokenizer's post-processor prepends ``<s>`` when ``add_special_tokens=True``; the training
target is ``" " + translation`` followed by ``</s>``, and only target tokens carry the loss.

Runs on one thread (``torch.set_num_threads(1)``); ``num2words`` is needed here only
(``pip install -e .[train]``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import torch

PROMPT_TEMPLATE = (
    "Translate from {source_lang} to {target_lang}.\n{source_lang}: {text}\n{target_lang}:"
)
SOURCE_LANG = "English"
LANG_NAMES = {"de": "German", "fr": "French"}
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK]  # ids 0, 1, 2, 3


def build_prompt(text: str, target_lang: str, source_lang: str = SOURCE_LANG) -> str:
    return PROMPT_TEMPLATE.format(source_lang=source_lang, target_lang=target_lang, text=text)


def words(n: int, lang: str) -> str:
    from num2words import num2words

    return num2words(n, lang=lang)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


class NumberData:
    """Splits ``0..max_number-1`` into held-out numbers (eval, sample) and a training pool.

    Training draws mix a uniform draw over the range (what the held-out eval measures) with a
    draw that first picks the number of digits, so that short numbers are seen often too, and
    some of those are rounded (trailing zeros), so that "three hundred" stops where it should.
    """

    def __init__(self, max_number: int, n_eval: int, n_sample: int, langs: list[str], seed: int):
        self.max_number = max_number
        self.langs = langs
        rng = random.Random(seed)
        self.eval_numbers = rng.sample(range(max_number), n_eval)
        held = set(self.eval_numbers)
        # The sample file: held-out numbers spread over 3..max digits (a more varied demo than a
        # uniform draw, which is nearly all of the longest length).
        max_digits = len(str(max_number - 1))
        lengths = list(range(min(3, max_digits), max_digits + 1))
        self.sample_numbers: list[int] = []
        while len(self.sample_numbers) < n_sample:
            d = lengths[len(self.sample_numbers) % len(lengths)]
            n = rng.randrange(10 ** (d - 1), min(10**d, max_number))
            if n not in held:
                held.add(n)
                self.sample_numbers.append(n)
        self.held_out = held
        self.max_digits = max_digits
        self.rng = random.Random(seed + 1)
        # 1- and 2-digit numbers are few (110) and easy: draw them less often.
        self.digit_choices = list(range(1, max_digits + 1))
        self.digit_weights = [1 if d <= 2 else 3 for d in self.digit_choices]

    def draw_train_number(self) -> int:
        rng = self.rng
        while True:
            u = rng.random()
            if u < 0.6:
                n = rng.randrange(self.max_number)
            else:
                d = rng.choices(self.digit_choices, weights=self.digit_weights)[0]
                lo = 0 if d == 1 else 10 ** (d - 1)
                n = rng.randrange(lo, min(10**d, self.max_number))
                if u < 0.75 and d > 1:  # round numbers (300, 5000) are rare in a uniform draw
                    n -= n % 10 ** rng.randint(1, d - 1)
            if n not in self.held_out:
                return n

    def draw_train_example(self) -> tuple[str, str]:
        n = self.draw_train_number()
        lang = self.langs[0] if len(self.langs) == 1 else self.rng.choice(self.langs)
        return build_prompt(words(n, "en"), LANG_NAMES[lang]), " " + words(n, lang)


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(data: NumberData, vocab_size: int, n_texts: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed + 2)
    corpus = []
    for _ in range(n_texts):
        n = rng.randrange(data.max_number) if rng.random() < 0.7 else rng.randrange(1000)
        lang = rng.choice(data.langs)
        corpus.append(build_prompt(words(n, "en"), LANG_NAMES[lang]) + " " + words(n, lang))
    # Every language name, so that "French"/"German" are whole tokens whichever is trained.
    corpus += [build_prompt("one", name) for name in LANG_NAMES.values()]

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any input text stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=128,
        padding_side="left",  # decoder-only: batched HF generate needs left padding
        clean_up_tokenization_spaces=False,
    )
    return hf


def check_tokenizer(tok, data: NumberData) -> None:
    """Round trips: decode(encode(x)) == x, BOS added once, prompt+target tokenize separably."""
    assert tok.chat_template is None
    rng = random.Random(0)
    texts = [words(rng.randrange(data.max_number), lang) for lang in data.langs for _ in range(200)]
    texts += ["Straße für 1 €, naïve façade — 東京", "  two  spaces\tand\nnewline "]
    for t in texts:
        for s in (t, " " + t):
            ids = tok(s, add_special_tokens=False).input_ids
            assert tok.decode(ids, skip_special_tokens=True) == s, (s, ids)
    for n in data.eval_numbers[:200]:
        for lang in data.langs:
            prompt, target = build_prompt(words(n, "en"), LANG_NAMES[lang]), " " + words(n, lang)
            p = tok(prompt).input_ids
            assert p[0] == tok.bos_token_id and tok.bos_token_id not in p[1:], p
            t = tok(target, add_special_tokens=False).input_ids
            joint = tok(prompt + target).input_ids
            assert joint == p + t, (prompt, target)
            assert tok.decode(t, skip_special_tokens=True) == target
            assert (
                tok.decode(p + t + [tok.eos_token_id], skip_special_tokens=True) == prompt + target
            )


def save_tokenizer(tok, out: Path) -> None:
    """Save the tokenizer files, readable by transformers 4.x and 5.x alike.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` and no special_tokens_map.json;
    name the class that both versions know and write the map too.
    """
    from transformers import AutoTokenizer

    tok.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("chat_template", "is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    back = AutoTokenizer.from_pretrained(out)
    probe = build_prompt("three hundred and forty-two", "German")
    assert back(probe).input_ids == tok(probe).input_ids
    assert back(probe).input_ids[0] == back.bos_token_id
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert back.chat_template is None


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def encode_examples(tok, examples: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    prompts = tok([p for p, _ in examples]).input_ids
    targets = tok([t for _, t in examples], add_special_tokens=False).input_ids
    eos = tok.eos_token_id
    return [(p, [*t, eos]) for p, t in zip(prompts, targets, strict=True)]


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(p) + len(t) for p, t in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (p, t) in enumerate(encoded):
        seq = p + t
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) : len(seq)] = torch.tensor(t)
        mask[i, : len(seq)] = 1
    return ids, mask, labels


def batches(data: NumberData, tok, batch_size: int, window: int = 16):
    """Endless length-bucketed batches: draw `window` batches, sort by length, shuffle the cuts."""
    rng = random.Random(1234)
    while True:
        enc = encode_examples(tok, [data.draw_train_example() for _ in range(batch_size * window)])
        enc.sort(key=lambda e: len(e[0]) + len(e[1]))
        cuts = [enc[i : i + batch_size] for i in range(0, len(enc), batch_size)]
        rng.shuffle(cuts)
        for c in cuts:
            yield collate(c, tok.pad_token_id)


def build_model(tok, args):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
    )
    # Eager attention trains faster on the CPU at these lengths than SDPA's flash backward.
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    return model


def lr_at(progress: float, peak: float, warmup: float, final_frac: float) -> float:
    if progress < warmup:
        return peak * progress / warmup
    p = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def train(model, data, tok, args) -> tuple[int, float, float]:
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    model.train()
    it = batches(data, tok, args.batch_size)
    t0 = time.time()
    step, tokens, loss_avg = 0, 0, None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)

    def loss_fn(ids, mask, labels):
        # Logits only where a target token is predicted: the prompt carries no loss.
        with autocast:
            h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            tgt = labels[:, 1:]
            sel = tgt != -100
            logits = model.lm_head(h[:, :-1][sel])
        return torch.nn.functional.cross_entropy(logits.float(), tgt[sel])

    if args.compile:
        loss_fn = torch.compile(loss_fn, dynamic=True)
    warm_s = 0.0  # the first step (and its torch.compile) runs at lr 0 and is timed apart
    while True:
        elapsed = time.time() - t0
        # The schedule follows whichever budget binds first: steps or seconds.
        progress = max(
            step / args.max_steps, (elapsed - warm_s) / max(1.0, args.time_budget - warm_s)
        )
        if progress >= 1.0:
            break
        lr = lr_at(progress, args.lr, args.warmup, args.final_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        ids, mask, labels = next(it)
        loss_t = loss_fn(ids, mask, labels)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step == 1:
            warm_s = time.time() - t0
            print(f"first step (warm-up{', compile' if args.compile else ''}): {warm_s:.1f}s")
        tokens += int(mask.sum())
        loss = float(loss_t.detach())
        loss_avg = loss if loss_avg is None else 0.98 * loss_avg + 0.02 * loss
        if step % args.log_every == 0:
            el = time.time() - t0
            print(
                f"step {step:6d}  loss {loss_avg:.4f}  lr {lr:.2e}  "
                f"{tokens / max(1e-9, el - warm_s):,.0f} tok/s  {el:6.1f}s",
                flush=True,
            )
        if args.eval_every and step % args.eval_every == 0:
            model.eval()
            em = exact_match(model, tok, data.eval_numbers[:200], data.langs[0], num_beams=1)
            lang = data.langs[0]
            print(f"  [eval@{step}] greedy exact match ({lang}, 200): {em['exact_match']:.3f}")
            model.train()
    return step, time.time() - t0, warm_s


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model, tok, prompts: list[str], num_beams: int, batch_size: int = 128) -> list[str]:
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        gen = model.generate(
            **enc,
            do_sample=False,
            num_beams=num_beams,
            max_new_tokens=64,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        new = gen[:, enc.input_ids.shape[1] :]
        outs += tok.batch_decode(new, skip_special_tokens=True)
    return outs


def exact_match(model, tok, numbers: list[int], lang: str, num_beams: int) -> dict:
    prompts = [build_prompt(words(n, "en"), LANG_NAMES[lang]) for n in numbers]
    refs = [words(n, lang) for n in numbers]
    hyps = generate(model, tok, prompts, num_beams)
    # The model emits " " + translation; the leading space is part of the target format.
    ok = [h == " " + r for h, r in zip(hyps, refs, strict=True)]
    errors = [(n, h, r) for n, h, r, k in zip(numbers, hyps, refs, ok, strict=True) if not k]
    return {"exact_match": sum(ok) / len(ok), "n": len(ok), "errors": errors}


def evaluate(model, tok, data, args) -> dict:
    model.eval()
    res: dict = {}
    for lang in data.langs:
        for name, beams in (("greedy", 1), ("beam4", 4)):
            t = time.time()
            r = exact_match(model, tok, data.eval_numbers, lang, beams)
            res[f"{lang}_{name}"] = r
            print(
                f"eval {lang} {name}: exact match {r['exact_match']:.4f} "
                f"({r['n']} held-out, {time.time() - t:.1f}s)",
                flush=True,
            )
            for n, h, ref in r["errors"][:5]:
                print(f"    {n}: got {h!r} want {' ' + ref!r}")
    return res


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------


def write_sample(data: NumberData, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True)
    nums = data.sample_numbers
    table = pa.table(
        {
            "id": [f"demo-{i:04d}" for i in range(len(nums))],
            "text": [words(n, "en") for n in nums],
            "reference": [words(n, "de") for n in nums],
        }
    )
    pq.write_table(table, path / "sample.parquet")
    (path / "README.md").write_text(
        "# Demo input\n\n"
        f"`sample.parquet` holds {len(nums)} rows for the default translate job "
        "(English -> German) with the bundled demo model in `pipeline/assets/demo_model`: `id` "
        '(string), `text` (an English number in words, e.g. "three hundred and forty-two") and '
        '`reference` (the German words from `num2words`, e.g. "dreihundertzweiundvierzig"). '
        f"The numbers have 3 to {data.max_digits} digits and were held out of training, so exact "
        "match against `reference` measures the model (and the engine that runs it). "
        "`jobs/train_demo_model.py` writes this file; rerun it to rebuild it.\n"
    )


def write_model_readme(out: Path, summary: dict) -> None:
    s = summary
    em = ", ".join(
        f"{lang}: greedy {s['results'][lang]['greedy_exact_match']:.3f}, "
        f"beam-4 {s['results'][lang]['beam4_exact_match']:.3f}"
        for lang in s["languages"]
    )
    (out / "README.md").write_text(
        "# Demo model\n\n"
        "A tiny Llama (`LlamaForCausalLM`, "
        f"{s['n_params']:,} parameters, float32 safetensors) trained from scratch by "
        "`jobs/train_demo_model.py` to translate English number words into "
        f"{' and '.join(LANG_NAMES[lang] for lang in s['languages'])} number words "
        f"(numbers {s['number_range'][0]}..{s['number_range'][1]}, `num2words`). Prompt:\n\n"
        "```\n"
        "<s>Translate from English to German.\\nEnglish: {text}\\nGerman:\n"
        "```\n\n"
        + ("Use `French` in place of `German` for French. " if "fr" in s["languages"] else "")
        + "(`<s>` comes from the tokenizer's post-processor with `add_special_tokens=True`). The "
        'model answers `" " + translation` then `</s>`. Held-out exact match with '
        f"`transformers.generate` on {s['n_eval']} numbers: {em}. See `EVAL.json`.\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("pipeline/assets/demo_model"))
    ap.add_argument("--sample-out", type=Path, default=Path("pipeline/assets/demo_input"))
    ap.add_argument("--langs", default="de,fr", help="comma-separated targets: de, fr")
    ap.add_argument("--max-number", type=int, default=1_000_000, help="numbers 0..max-1")
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--n-sample", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=1000)
    ap.add_argument("--tokenizer-texts", type=int, default=100_000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=float, default=0.03, help="fraction of the run")
    ap.add_argument("--final-lr-frac", type=float, default=0.05)
    ap.add_argument("--max-steps", type=int, default=6000)
    ap.add_argument("--time-budget", type=float, default=660.0, help="seconds of training")
    ap.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast for the forward (fp32 master weights)",
    )
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile the training step (about 1.5x faster on the CPU after ~1 min)",
    )
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    langs = [x.strip() for x in args.langs.split(",") if x.strip()]
    assert all(lang in LANG_NAMES for lang in langs), langs

    data = NumberData(args.max_number, args.n_eval, args.n_sample, langs, args.seed)
    t = time.time()
    tok = train_tokenizer(data, args.vocab_size, args.tokenizer_texts, args.seed)
    check_tokenizer(tok, data)
    print(f"tokenizer: vocab {len(tok)}, trained and checked in {time.time() - t:.1f}s")
    ex = build_prompt(words(342567, "en"), LANG_NAMES[langs[0]])
    print("example:", tok.convert_ids_to_tokens(tok(ex + " " + words(342567, langs[0])).input_ids))

    model = build_model(tok, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    steps, secs, warm_s = train(model, data, tok, args)
    print(f"trained {steps} steps in {secs:.0f}s")
    res = evaluate(model, tok, data, args)
    sample = exact_match(model, tok, data.sample_numbers, "de", 1)
    print(f"sample.parquet rows, greedy exact match (de): {sample['exact_match']:.4f}")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file():
            f.unlink()
    model.save_pretrained(out, safe_serialization=True)
    (out / "model.safetensors").chmod(0o644)
    save_tokenizer(tok, out)
    # Older readers (transformers 4.x, simple loaders) look for a top-level rope_theta.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("rope_theta", 10000.0)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt")), "no pickle files"

    first = langs[0]
    summary = {
        "task": "English number words -> " + ", ".join(LANG_NAMES[x] for x in langs),
        "prompt_template": PROMPT_TEMPLATE,
        "source_lang": SOURCE_LANG,
        "languages": langs,
        "number_range": [0, args.max_number - 1],
        "n_eval": len(data.eval_numbers),
        "greedy_exact_match": res[f"{first}_greedy"]["exact_match"],
        "beam4_exact_match": res[f"{first}_beam4"]["exact_match"],
        "results": {
            lang: {
                "greedy_exact_match": res[f"{lang}_greedy"]["exact_match"],
                "beam4_exact_match": res[f"{lang}_beam4"]["exact_match"],
            }
            for lang in langs
        },
        "sample_greedy_exact_match_de": sample["exact_match"],
        "n_sample": len(data.sample_numbers),
        "eval_method": "transformers generate, float32, max_new_tokens=64, exact string match of "
        "the decoded continuation against ' ' + num2words(n, lang)",
        "eval_numbers": "drawn uniformly from the range (seed), never trained on",
        "train_steps": steps,
        "train_seconds": round(secs, 1),
        "first_step_seconds": round(warm_s, 1),
        "time_budget_seconds": args.time_budget,
        "max_steps": args.max_steps,
        "compile": args.compile,
        "batch_size": args.batch_size,
        "torch_threads": args.threads,
        "bf16_autocast": args.bf16,
        "lr": args.lr,
        "seed": args.seed,
        "vocab_size": len(tok),
        "n_params": n_params,
        "model": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
        },
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "torch": torch.__version__,
    }
    (out / "EVAL.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_model_readme(out, summary)
    write_sample(data, args.sample_out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB) and {args.sample_out}/sample.parquet")
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
