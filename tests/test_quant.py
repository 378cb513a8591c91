"""Quantized weights: bitsandbytes formats and modules as the reference, transformers as the
oracle for pre-quantized checkpoints, full precision as the bound for quality."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from test_engine_parity import make_engine, random_prompts
from tiny_models import build_model

from pipeline.engine.config import ConfigError, EngineConfig, ModelConfig, QuantConfig
from pipeline.engine.engine import LLMEngine
from pipeline.engine.params import BeamParams, SamplingParams
from pipeline.engine.runner import ModelRunner
from pipeline.engine.scheduler import ScheduledBatch
from pipeline.engine.sequence import Sequence
from pipeline.models.loader import load_model, read_spec
from pipeline.models.quant import QuantLinear, QuantSpec, resolve_quant

CPU = torch.device("cpu")
DEVICE = torch.device(os.environ.get("PIPELINE_TEST_DEVICE", "cpu"))  # jobs/gpu_check.sh: cuda
# On a CPU with avx512_bf16, bitsandbytes' 4-bit layers run its own CPU kernel, which
# computes in bf16 (relative error ~2^-8) and repacks the stored weight at the first forward.
BNB_BF16 = bool(bnb.functional.has_avx512bf16())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    build_model(directory, "llama")
    return directory


def bnb_reference(method: str, weight: torch.Tensor, bias: torch.Tensor) -> torch.nn.Module:
    out_features, in_features = weight.shape
    if method == "int8":
        module = bnb.nn.Linear8bitLt(in_features, out_features, has_fp16_weights=False)
        module.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False)
    else:
        module = bnb.nn.Linear4bit(
            in_features, out_features, compute_dtype=torch.float32, quant_type=method
        )
        module.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=method)
    module.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return module.to(DEVICE).eval()  # quantizes; eval: inference kernels, as in a served model


def test_dequant_buffer_first_made_under_inference_mode_serves_no_grad_later():
    # The engine runs under inference_mode, a caller may then run under no_grad: the shared
    # dequantize buffer must not be an inference tensor.
    layer = QuantLinear(128, 4096, False, QuantSpec("int8", torch.float32))  # widest yet
    layer.set_weight(torch.randn(4096, 128, device=DEVICE))
    x = torch.randn(2, 128, device=DEVICE)
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), first)


@pytest.mark.parametrize("method", ["int8", "nf4", "fp4"])
def test_quant_linear_matches_bitsandbytes_module(method):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 128) * 0.05, torch.randn(96), torch.randn(5, 128)
    reference = bnb_reference(method, weight, bias)
    # Its stored bits as quantized: on a CPU with avx512_bf16 its first forward repacks 4-bit
    # weights in place into a layout for its own CPU kernel.
    stored = reference.weight.data.clone()
    ours = QuantLinear(128, 96, True, QuantSpec(method, torch.float32))  # double quant, as bnb
    ours.bias = torch.nn.Parameter(bias.clone().to(DEVICE))
    ours.set_weight(weight.to(DEVICE))
    x, bias = x.to(DEVICE), bias.to(DEVICE)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
        ours.spec = QuantSpec(method, torch.float32, matmul="bitsandbytes")
        via_bnb = ours(x)
    # The same stored bits as bitsandbytes' own module...
    assert torch.equal(ours.qweight.view(-1), stored.view(-1))
    if method == "int8":
        # ...its int8 matmul quantizes activations too; ours multiplies them unquantized.
        torch.testing.assert_close(got, x @ ours.dequantize().t() + bias)
        assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
        torch.testing.assert_close(via_bnb, expected, atol=1e-5, rtol=1e-5)
        return
    torch.testing.assert_close(got, x @ ours.dequantize().t() + bias)
    # bitsandbytes' 4-bit product: fp32, except on a CPU with avx512_bf16 (BNB_BF16).
    atol = 0.02 * expected.abs().max().item() if DEVICE.type == "cpu" and BNB_BF16 else 1e-5
    torch.testing.assert_close(got, expected, atol=atol, rtol=1e-5)
    torch.testing.assert_close(via_bnb, expected, atol=atol, rtol=1e-5)


def prefill_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """Logits [total tokens, vocab] of packed prompts through our runner."""
    runner = ModelRunner(model, 64, 4, CPU)
    seqs, next_block = [], 0
    for p in prompts:
        blocks = -(-len(p) // 4)
        seqs.append(
            Sequence(list(p), len(p), block_table=list(range(next_block, next_block + blocks)))
        )
        next_block += blocks
    inputs = runner.prepare(ScheduledBatch(True, seqs, []), {})
    with torch.no_grad():
        hidden = model(inputs.input_ids, inputs.positions, inputs.meta, runner.kv_caches)
        return model.compute_logits(hidden)


# Stated bounds on a random tiny model (hidden 64): the largest logit error relative to the
# largest logit, and the share of greedy steps (16 tokens x 12 prompts) that agree.
BOUNDS = {"int8": (0.02, 0.95), "nf4": (0.15, 0.75), "fp4": (0.2, 0.75)}


@pytest.mark.parametrize("method", ["int8", "nf4", "fp4"])
def test_quantized_model_stays_close_to_full_precision(model_dir, method):
    spec = read_spec(model_dir)
    prompts = random_prompts(4, seed=5, low=6, high=20)
    full = prefill_logits(load_model(model_dir, spec, torch.float32, CPU, 256), prompts)
    quant = QuantSpec(method, torch.float32)
    model = load_model(model_dir, spec, torch.float32, CPU, 256, quant)
    assert {type(m) for m in model.modules()} >= {QuantLinear}
    assert type(model.lm_head) is torch.nn.Linear  # skipped: stays in full precision
    logits = prefill_logits(model, prompts)
    relative, agreement = BOUNDS[method]
    assert (logits - full).abs().max() <= relative * full.abs().max()

    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = random_prompts(12, seed=1)
    ref = make_engine(model_dir).generate(prompts, greedy)
    outs = make_engine_quant(model_dir, method).generate(prompts, greedy)
    pairs = [
        (a, b)
        for o, r in zip(outs, ref, strict=True)
        for a, b in zip(o.outputs[0].token_ids, r.outputs[0].token_ids, strict=True)
    ]
    assert sum(a == b for a, b in pairs) >= agreement * len(pairs)


def make_engine_quant(model_dir, method: str, **quant) -> LLMEngine:
    settings = EngineConfig(
        device=DEVICE.type,
        dtype="float32",
        block_size=4,
        kv_cache_memory=8 * 2**20,
        max_num_seqs=32,
    )
    return LLMEngine.from_config(
        ModelConfig(path=str(model_dir)), settings, QuantConfig(method=method, **quant)
    )


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(n=3, temperature=0.8, top_p=0.9, max_tokens=8, seed=1),
        BeamParams(width=3, num_return=2, max_tokens=8),
    ],
    ids=["n3-sampling", "beam3"],
)
def test_every_engine_path_runs_quantized(model_dir, params):
    engine = make_engine_quant(model_dir, "nf4")
    outs = engine.generate(random_prompts(6, seed=4), params)
    assert all(len(o.outputs) == (3 if isinstance(params, SamplingParams) else 2) for o in outs)
    assert engine.model_info["quant"] == "nf4"


def test_quantized_weights_take_less_memory_and_leave_room_for_kv(model_dir):
    full = make_engine(model_dir).model_info["weight_bytes"]
    for method, share in (("int8", 0.55), ("nf4", 0.45)):
        model = load_model(
            model_dir,
            read_spec(model_dir),
            torch.float32,
            CPU,
            256,
            QuantSpec(method, torch.float32),
        )
        linear = [m for m in model.modules() if isinstance(m, QuantLinear)]
        quantized = sum(m.weight_bytes() for m in linear)
        fp32 = sum(m.shape.numel() * 4 for m in linear)
        assert quantized <= share / 2 * fp32  # the share is of bf16 bytes
        info = make_engine_quant(model_dir, method).model_info
        assert info["weight_bytes"] < full


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_prequantized_transformers_checkpoint_loads_and_matches(tmp_path, model_dir, method):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = (
        BitsAndBytesConfig(load_in_8bit=True)
        if method == "int8"
        else BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    )
    hf = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=config, device_map="cpu"
    )
    hf.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (model_dir / name).exists():
            (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    prompts = random_prompts(3, seed=6, low=6, high=20)
    with torch.no_grad():
        expected = torch.cat([hf(torch.tensor([p])).logits[0] for p in prompts])

    spec = read_spec(tmp_path)
    quant = resolve_quant("none", torch.float32, json.loads((tmp_path / "config.json").read_text()))
    assert quant is not None and quant.method == method
    logits = prefill_logits(load_model(tmp_path, spec, torch.float32, CPU, 256, quant), prompts)
    if method == "nf4" and BNB_BF16:  # transformers' side ran bitsandbytes' bf16 CPU kernel
        assert (logits - expected).abs().max() <= 0.02 * expected.abs().max()
    elif method == "nf4":  # the same dequantized weights: equal up to float rounding
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    else:  # transformers' LLM.int8 quantizes activations (outliers above 6.0 aside)
        assert (logits - expected).abs().max() <= 0.03 * expected.abs().max()
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95

    with pytest.raises(ConfigError, match="already quantized"):
        make_engine_quant(tmp_path, "fp4")


def test_quant_config_errors_say_what_to_use():
    with pytest.raises(ConfigError, match="none, int8, nf4 or fp4"):
        QuantConfig(method="int4")
    with pytest.raises(ConfigError, match="only bitsandbytes"):
        resolve_quant("none", torch.float32, {"quantization_config": {"quant_method": "gptq"}})


def test_unquantized_runs_never_import_bitsandbytes():
    """bitsandbytes is imported at the first quantized layer: it costs ~3 s of start-up (and a
    warning on some CPUs) that an unquantized run does without; a quantized one still works."""
    code = (
        "import sys\n"
        "from pipeline.assets import demo_model_dir\n"
        "from pipeline.engine.config import EngineConfig, ModelConfig, QuantConfig\n"
        "from pipeline.engine.engine import LLMEngine\n"
        "from pipeline.engine.params import SamplingParams\n"
        "model = ModelConfig(path=str(demo_model_dir()))\n"
        "params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)\n"
        "engine = LLMEngine.from_config(model, EngineConfig(device='cpu'))\n"
        "assert len(engine.generate([[1, 2, 3]], params)[0].outputs[0].token_ids) == 3\n"
        "assert 'bitsandbytes' not in sys.modules, 'imported without quantization'\n"
        "engine = LLMEngine.from_config(model, EngineConfig(device='cpu'), QuantConfig('nf4'))\n"
        "assert 'bitsandbytes' in sys.modules\n"
        "assert len(engine.generate([[1, 2, 3]], params)[0].outputs[0].token_ids) == 3\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=300)


def test_importing_bitsandbytes_drops_only_its_hub_kernel_warning() -> None:
    """bitsandbytes' import warns on avx512_bf16 CPUs that it could not fetch a hub kernel
    (always, offline); that record is dropped, any other from the same logger kept."""
    from pipeline.models import quant

    quant.bnb.nn  # noqa: B018 - the first attribute read imports bitsandbytes
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")

    def record(message: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, message, (), None)

    assert not logger.filter(record("Failed to load CPU gemm_4bit_forward from kernels-community"))
    assert logger.filter(record("something else went wrong"))
