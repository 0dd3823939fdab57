"""The fused NF4 kernel (server/engine/nf4_cpu.py) against bitsandbytes' dequantize + matmul."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch

from loraplex.server.default_model import default_model_path
from loraplex.server.engine import Engine, EngineConfig, SamplingParams, cpu_extension, lora_cpu, nf4_cpu
from loraplex.server.engine.lora import LoraBatch, LoraSlots, SlotSet
from loraplex.server.engine.nf4 import NF4_BLOCKSIZE, NF4_DOUBLE_QUANT
from loraplex.server.engine.spec import PROJECTIONS
from loraplex.server.model_files import iter_weights, model_spec
from support import ARCHITECTURES, write_tiny_model

pytestmark = pytest.mark.skipif(not nf4_cpu.available(), reason="no C++ compiler: the kernel cannot be built here")

TOKEN_COUNTS = [*range(1, 68), 512]
#: [out, in] shapes whose rows straddle NF4 blocks (in_features % 64 != 0; no family here has one).
STRADDLING = [(96, 32), (64, 96), (128, 160)]


def projection_shapes(folder: Path) -> set[tuple[int, int]]:
    """{(out_features, in_features)} of every projection of the model in `folder`."""
    spec = model_spec(folder)
    return {spec.projection_shape(proj)[::-1] for proj in PROJECTIONS}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> list[tuple[int, int]]:
    root = tmp_path_factory.mktemp("families")
    found = set().union(*(projection_shapes(write_tiny_model(arch, root / arch)) for arch in ARCHITECTURES))
    return sorted(found | projection_shapes(default_model_path()))


def quantized(out_features: int, in_features: int, seed: int) -> tuple[torch.Tensor, bnbf.QuantState]:
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    return bnbf.quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, compress_statistics=NF4_DOUBLE_QUANT, quant_type="nf4")


def reference_dequantize(packed: torch.Tensor, state: bnbf.QuantState,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out, in] in `dtype`: bitsandbytes' NF4 values read flat (block b = weights [64b, 64b + 64) of the
    flattened weight, as its quantizer, its portable path and CUDA all read them), in plain torch.

    Not `dequantize_4bit` itself: on AVX-512 CPUs bitsandbytes 0.50 dequantizes with a native kernel that
    takes blocks per row, which is wrong for weights whose in_features is not a multiple of 64 (K=96 rows
    get other rows' absmax; seen on a Xeon with AVX-512). Where in_features is a multiple of 64 both
    agree, and `test_dequantized_values_are_bit_identical_to_bitsandbytes` checks bitsandbytes itself."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1).long()  # [out * in]
    nested = state.state2
    scale = nested.absmax.float().repeat_interleave(nested.blocksize)[: state.absmax.numel()]
    absmax = nested.code.float()[state.absmax.long()] * scale + state.offset  # [blocks], two roundings
    values = state.code.float()[codes] * absmax.repeat_interleave(state.blocksize)[: codes.numel()]
    return values.reshape(state.shape).to(dtype)


def test_the_shapes_cover_the_tiny_families_and_smollm2(shapes) -> None:
    assert (576, 576) in shapes and (1536, 576) in shapes and (576, 1536) in shapes and (192, 576) in shapes
    assert (64, 64) in shapes and len(shapes) >= 8


def test_dequantized_values_are_bit_identical_to_bitsandbytes(shapes) -> None:
    for seed, (out_features, in_features) in enumerate(shapes):
        packed, state = quantized(out_features, in_features, seed)
        weight = nf4_cpu.Nf4Weight.from_quant_state(packed, state)
        assert torch.equal(nf4_cpu.nf4_dequantize(weight), bnbf.dequantize_4bit(packed, state))
        state.dtype = torch.bfloat16
        assert torch.equal(nf4_cpu.nf4_dequantize(weight, bf16=True), bnbf.dequantize_4bit(packed, state).float())


@pytest.mark.parametrize("shape", STRADDLING, ids=str)
def test_weights_whose_rows_straddle_nf4_blocks_decode_flat(shape: tuple[int, int]) -> None:
    """in_features % 64 != 0: blocks run across rows, and the kernel reads them as bitsandbytes stores them."""
    packed, state = quantized(*shape, seed=7)
    weight = nf4_cpu.Nf4Weight.from_quant_state(packed, state)
    assert torch.equal(nf4_cpu.nf4_dequantize(weight), reference_dequantize(packed, state))
    assert torch.equal(nf4_cpu.nf4_dequantize(weight, bf16=True),
                       reference_dequantize(packed, state, torch.bfloat16).float())


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_products_match_bitsandbytes_dequantize_then_matmul(shapes, with_bias: bool) -> None:
    """Every shape, every token count 1..67 and 512, through the kernel's own loop and its BLAS path."""
    generator = torch.Generator().manual_seed(3)
    for seed, (out_features, in_features) in enumerate([*shapes, *STRADDLING]):
        packed, state = quantized(out_features, in_features, seed)
        weight = nf4_cpu.Nf4Weight.from_quant_state(packed, state)
        dense = reference_dequantize(packed, state).double()  # [out, in]
        bias = torch.randn(out_features, generator=generator) if with_bias else None
        for tokens in TOKEN_COUNTS:
            x = torch.randn(tokens, in_features, generator=generator)
            expected = x.double() @ dense.T + (0 if bias is None else bias.double())
            actual = nf4_cpu.nf4_linear(x, weight, bias)
            assert actual.shape == (tokens, out_features) and actual.dtype == torch.float32
            # float32 accumulation over in_features terms: error relative to the sum of |terms|
            bound = 1e-6 * in_features * (x.abs().double() @ dense.abs().T + 1)
            assert ((actual.double() - expected).abs() <= bound).all(), (out_features, in_features, tokens)


def test_both_paths_agree_and_rows_do_not_depend_on_their_neighbours() -> None:
    packed, state = quantized(192, 576, seed=0)
    weight = nf4_cpu.Nf4Weight.from_quant_state(packed, state)
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(1))
    loop = nf4_cpu.nf4_linear(x, weight, blas_min_tokens=10**6)
    blas = nf4_cpu.nf4_linear(x, weight, blas_min_tokens=1)
    assert ((loop - blas).abs().max() / blas.abs().max()).item() < 1e-6
    for row in (0, 7, 39):  # the loop computes each token alone: same bits at any position of any batch
        assert torch.equal(nf4_cpu.nf4_linear(x[row:row + 1], weight, blas_min_tokens=10**6)[0], loop[row])


@pytest.mark.parametrize("with_bias", [False, True])
def test_a_group_of_weights_gives_the_bits_of_each_weight_alone(shapes, with_bias: bool) -> None:
    """The weights of each in_features of the families and SmolLM2 together (as a layer's q, k, v or gate, up are
    called), every token count 1..67 and 512: each output has the bits of `nf4_linear` on its weight alone."""
    generator = torch.Generator().manual_seed(8)
    for in_features in sorted({k for _, k in shapes}):
        group = [out for out, k in shapes if k == in_features] + [in_features + 8]  # + a tile count not a multiple
        weights = [nf4_cpu.Nf4Weight.from_quant_state(*quantized(out, in_features, seed))
                   for seed, out in enumerate(group)]
        biases = [torch.randn(out, generator=generator) if with_bias and i % 2 == 0 else None
                  for i, out in enumerate(group)]
        for tokens in TOKEN_COUNTS:
            x = torch.randn(tokens, in_features, generator=generator)
            together = nf4_cpu.Nf4Group(weights, biases)(x)
            for weight, bias, y in zip(weights, biases, together, strict=True):
                assert torch.equal(y, nf4_cpu.nf4_linear(x, weight, bias)), (in_features, weight.out_features, tokens)


@pytest.mark.parametrize("with_bias", [False, True])
def test_a_group_with_lora_gives_the_bits_of_the_group_then_the_lora_kernel(shapes, with_bias: bool) -> None:
    """`Nf4Group.with_lora` (base, bias and adapters' terms in one call; each thread adds the expand to the rows it
    computed, so ranges of outputs begin and end anywhere) gives the bits of the group's call followed by
    `lora_cpu_group`, for the weights of each in_features of the families and SmolLM2, every token count below the
    BLAS threshold, tokens of several adapters (ranks 16, 5 and 1, and an empty slot) mixed with base-only ones."""
    generator = torch.Generator().manual_seed(9)
    ranks = [16, 5, 1, 0]
    for in_features in sorted({k for _, k in shapes}):
        group = [out for out, k in shapes if k == in_features] + [in_features + 8]
        weights = [nf4_cpu.Nf4Weight.from_quant_state(*quantized(out, in_features, seed))
                   for seed, out in enumerate(group)]
        biases = [torch.randn(out, generator=generator) if with_bias and i % 2 == 0 else None
                  for i, out in enumerate(group)]
        slots = [LoraSlots(len(ranks), 16, in_features, out, torch.float32, torch.device("cpu")) for out in group]
        for projection in slots:
            for slot, rank in enumerate(ranks[:-1]):
                projection.set_slot(slot, torch.randn(rank, in_features, generator=generator),
                                    torch.randn(projection.B.shape[2], rank, generator=generator), 0.5 + slot)
        slot_set = SlotSet(slots)
        fused = nf4_cpu.Nf4Group(weights, biases, slot_set)
        plain = nf4_cpu.Nf4Group(weights, biases)
        assert fused.adds_lora and not plain.adds_lora
        for tokens in range(1, nf4_cpu.calibrated_blas_min_tokens()):
            x = torch.randn(tokens, in_features, generator=generator)
            slot_ids = torch.randint(-1, len(ranks), (tokens,), generator=generator).tolist()
            slot_ids[0] = 0  # at least one adapter token
            batch = LoraBatch.build(slot_ids, ranks, torch.device("cpu"))
            together = fused.with_lora(x, batch)
            expected = lora_cpu.lora_cpu_group(plain(x), x, slot_set, batch)
            for y, reference in zip(together, expected, strict=True):
                assert torch.equal(y, reference), (in_features, y.shape[1], tokens)
        at_threshold = torch.randn(nf4_cpu.calibrated_blas_min_tokens(), in_features, generator=generator)
        assert fused.with_lora(at_threshold, LoraBatch.build([0] * len(at_threshold), ranks, torch.device("cpu"))) \
            is None  # BLAS sizes: the caller runs the group, then the LoRA op


def test_the_blas_threshold_is_measured_once_and_kept_beside_the_build(tmp_path, monkeypatch) -> None:
    """No value kept: measured on this CPU (one of the counts tried, or past them all) and written beside the build
    (where cpu_extension would cache it); a value kept there is read back as it is, not measured again; a folder
    that cannot be written to (a baked image) only means the value is not kept."""
    monkeypatch.setattr(cpu_extension, "_build_root", tmp_path)
    nf4_cpu.calibrated_blas_min_tokens.cache_clear()
    try:
        measured = nf4_cpu.calibrated_blas_min_tokens()
        assert measured in (*nf4_cpu.CALIBRATION_TOKENS, nf4_cpu.CALIBRATION_TOKENS[-1] + 1)
        kept = cpu_extension.folder_of("nf4_linear", nf4_cpu._SOURCE, nf4_cpu.CFLAGS) / "blas_min_tokens.json"
        assert json.loads(kept.read_text())["blas_min_tokens"] == measured
        kept.write_text(json.dumps({"blas_min_tokens": 77}))
        nf4_cpu.calibrated_blas_min_tokens.cache_clear()
        assert nf4_cpu.calibrated_blas_min_tokens() == 77
        blocked = tmp_path / "a-file"  # builds "under" a file: no folder can be made there, even by root
        blocked.write_text("")
        monkeypatch.setattr(cpu_extension, "_build_root", blocked)
        nf4_cpu.calibrated_blas_min_tokens.cache_clear()
        assert nf4_cpu.calibrated_blas_min_tokens() in (*nf4_cpu.CALIBRATION_TOKENS, nf4_cpu.CALIBRATION_TOKENS[-1] + 1)
    finally:
        nf4_cpu.calibrated_blas_min_tokens.cache_clear()  # later tests: this machine's own kept value


def test_bfloat16_activations_give_bfloat16_products_of_bf16_rounded_weights(shapes) -> None:
    """Every shape and token count, bfloat16 x: exact products of bf16-rounded weights, float32 sums,
    one rounding to bfloat16 at the end (on AMX where the CPU has it, see test_bf16_path)."""
    generator = torch.Generator().manual_seed(3)
    for seed, (out_features, in_features) in enumerate([*shapes, *STRADDLING]):
        packed, state = quantized(out_features, in_features, seed)
        weight = nf4_cpu.Nf4Weight.from_quant_state(packed, state)
        dense = reference_dequantize(packed, state, torch.bfloat16).double()  # [out, in], bf16-rounded values
        for tokens in TOKEN_COUNTS:
            x = torch.randn(tokens, in_features, generator=generator).to(torch.bfloat16)
            actual = nf4_cpu.nf4_linear(x, weight)
            assert actual.shape == (tokens, out_features) and actual.dtype == torch.bfloat16
            expected = x.double() @ dense.T
            bound = 2 ** -8 * expected.abs() + 1e-6 * in_features * (x.abs().double() @ dense.abs().T + 1)
            assert ((actual.double() - expected).abs() <= bound).all(), (out_features, in_features, tokens)


def test_bfloat16_results_do_not_depend_on_the_batch() -> None:
    packed, state = quantized(192, 576, seed=5)
    weight = nf4_cpu.Nf4Weight.from_quant_state(packed, state)
    # the most tokens the kernel's own loop takes here (AMX's threshold, or the one calibrated on this CPU)
    x = torch.randn(nf4_cpu.blas_min_tokens_for(torch.bfloat16) - 1, 576, generator=torch.Generator().manual_seed(6))
    x = x.to(torch.bfloat16)
    batch = nf4_cpu.nf4_linear(x, weight)
    for tokens in (1, 2, 5, 16, 17, 40):
        assert torch.equal(nf4_cpu.nf4_linear(x[:tokens], weight), batch[:tokens]), tokens


def test_bf16_path() -> None:
    """AMX where the CPU has AMX-BF16 and AVX512-BF16 (Linux grants the tile state), else the others."""
    flags = cpu_extension.cpu_flags().split()
    if "amx_bf16" in flags and "avx512_bf16" in flags:
        assert nf4_cpu.bf16_path() == "amx"
    else:
        assert nf4_cpu.bf16_path() == ("avx512_bf16" if "avx512_bf16" in flags else "float32")


# -- the engine's choice -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2") / "base")  # qkv bias: the bias path too


def engine(folder: Path, nf4_kernel: str) -> Engine:
    return Engine(model_spec(folder), iter_weights(folder),
                  EngineConfig(nf4_kernel=nf4_kernel, num_slots=2, max_rank=8, kv_cache_bytes=2**20))


def test_auto_uses_the_fused_kernel_and_matches_bitsandbytes(tiny_llama: Path) -> None:
    fused, portable = engine(tiny_llama, "auto"), engine(tiny_llama, "bitsandbytes")
    assert all(p.base.kernel_weight is not None for _, _, p in fused.model.projections())
    assert all(p.base.kernel_weight is None for _, _, p in portable.model.projections())
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(10, 60))]
    sampling = SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert fused.generate(prompts, sampling) == portable.generate(prompts, sampling)


def test_auto_falls_back_to_bitsandbytes_without_the_kernel(tiny_llama: Path, monkeypatch) -> None:
    monkeypatch.setattr(nf4_cpu, "available", lambda: False)
    assert all(p.base.kernel_weight is None for _, _, p in engine(tiny_llama, "auto").model.projections())
    with pytest.raises(ValueError, match="nf4_kernel='fused' needs"):
        engine(tiny_llama, "fused")


def test_a_machine_without_a_compiler_serves_through_bitsandbytes(tiny_llama: Path, tmp_path: Path) -> None:
    """A fresh build folder and no working C++ compiler: the engine starts and generates, on bitsandbytes."""
    script = (
        "import sys\nfrom pathlib import Path\n"
        "from loraplex.server.engine import Engine, EngineConfig, SamplingParams, nf4_cpu\n"
        "from loraplex.server.model_files import iter_weights, model_spec\n"
        "folder = Path(sys.argv[1])\n"
        "config = EngineConfig(num_slots=1, max_rank=8, kv_cache_bytes=2**20)\n"
        "e = Engine(model_spec(folder), iter_weights(folder), config)\n"
        "assert not nf4_cpu.available()\n"
        "assert all(p.base.kernel_weight is None for _, _, p in e.model.projections())\n"
        "print(e.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0])\n"
    )
    env = {**os.environ, "LORAPLEX_HOME": str(tmp_path / "home"), "CXX": str(tmp_path / "no-such-compiler")}
    done = subprocess.run([sys.executable, "-c", script, str(tiny_llama)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "unavailable" in done.stderr and len(ast.literal_eval(done.stdout.strip())) == 4


@pytest.mark.parametrize("flags", [("-mno-avx2", "-mno-fma", "-mno-avx512f"), ("-mno-avx512f",)],
                         ids=["plain_cpp", "avx2_only"])
def test_the_other_cpu_paths_give_the_same_values(flags: tuple[str, ...]) -> None:
    """The kernel built as for a CPU without AVX2/FMA/AVX-512, or with AVX2 but no AVX-512 (on the CPUs
    that have them, each path runs here too: `-march=native` minus those), decodes the same bits and
    multiplies within the same bound, and a token's result does not depend on its batch there either."""
    if "-mno-avx2" not in flags and "avx2" not in cpu_extension.cpu_flags().split():
        pytest.skip("this CPU has no AVX2")
    portable = cpu_extension.build("nf4_linear_" + "_".join(f.strip("-").replace("-", "_") for f in flags),
                                   nf4_cpu._SOURCE,
                                   (*nf4_cpu.CFLAGS, *flags))
    assert portable is not None
    packed, state = quantized(96, 96, seed=4)
    weight = nf4_cpu.Nf4Weight.from_quant_state(packed, state)
    args = weight._state_args()
    dense = reference_dequantize(packed, state)  # [96, 96]
    assert torch.equal(portable.nf4_dequantize(*args, 96, False), dense)
    x = torch.randn(9, 96, generator=torch.Generator().manual_seed(5))
    batch = portable.nf4_linear(x, *args, None, 4, 48)
    bound = 1e-6 * 96 * (x.abs().double() @ dense.abs().double().T + 1)
    assert ((batch.double() - x.double() @ dense.double().T).abs() <= bound).all()
    assert torch.equal(portable.nf4_linear(x[4:5], *args, None, 4, 48)[0], batch[4])
    head = dense.bfloat16()  # [96, 96]: read as bfloat16, the bits of its float32 copy
    assert torch.equal(portable.dense_linear(x, head), portable.dense_linear(x, head.float()))


def test_a_bfloat16_lm_head_gives_the_bits_of_its_float32_copy(tiny_llama: Path) -> None:
    """dense_linear reads a bf16 weight widened exactly: the same bits as the float32 copy at every row count the
    model uses it for; the model keeps its lm_head for the kernel as bf16 only when every value is one."""
    generator = torch.Generator().manual_seed(8)
    head = torch.randn(1000, 576, generator=generator).bfloat16()  # [vocab, hidden]
    for tokens in (1, 3, 4, 5, 17, nf4_cpu.DENSE_MAX_TOKENS):
        x = torch.randn(tokens, 576, generator=generator)
        assert torch.equal(nf4_cpu.dense_linear(x, head), nf4_cpu.dense_linear(x, head.float())), tokens
    spec = model_spec(tiny_llama)
    engine = Engine(spec, iter_weights(tiny_llama), EngineConfig(num_slots=1, max_rank=8))
    model = engine.model
    assert model.head_on_kernel and model.kernel_head.dtype == torch.float32  # random float32 values: kept
    bf16_exact = ((name, tensor.bfloat16().float()) for name, tensor in iter_weights(tiny_llama))
    rounded = Engine(spec, bf16_exact, EngineConfig(num_slots=1, max_rank=8)).model
    assert rounded.kernel_head.dtype == torch.bfloat16
    assert torch.equal(rounded.kernel_head.float(), rounded.lm_head)


def test_a_group_refuses_weights_of_different_in_features() -> None:
    weights = [nf4_cpu.Nf4Weight.from_quant_state(*quantized(64, k, seed)) for seed, k in enumerate((64, 96))]
    with pytest.raises(ValueError, match="one in_features"):
        nf4_cpu.Nf4Group(weights, [None, None])
