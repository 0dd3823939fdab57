"""Engine throughput with many adapters vs the base alone vs transformers + PEFT (issue: engine core).

One process, one run, modes measured side by side (32 requests unless the name says otherwise):
  (a) base only            (b) 32 requests on one adapter     (c) 32 distinct r=16 all-linear adapters
  (d) 32 adapters, ranks 8/16/32/64                          (e) transformers + PEFT generate(adapter_names=...)
  (f) base only, sampling (temperature 0.8, top-p 0.95, seeded) instead of greedy decoding
  (g) base only on dense float32 weights, same engine code   (h) 8 distinct adapters, 4 requests each
  (a)/(g) also with 8 and 1 requests, (a) with nf4_kernel=bitsandbytes, and (a) with 32/8/1 requests
  and (c) with bfloat16 compute (AMX where the CPU has it)
It also measures memory bandwidth and matmul rate to compute the physical floor of (c)'s LoRA work,
times every projection shape alone (fused NF4 kernel vs bitsandbytes vs dense float32 vs the
kernel's dequantize + BLAS path, over token counts), and profiles one decode step of (a) by op.

    python benchmarks/engine_throughput.py            # SmolLM2-135M-Instruct, NF4 (the default model)
    python benchmarks/engine_throughput.py --tiny     # a random tiny llama, for a quick check
    python benchmarks/engine_throughput.py --device cuda   # the GPU set (engine_throughput_cuda.py)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from loraplex.adapters.bnb_compat import nf4_config, use_portable_nf4_path
from loraplex.adapters.peft_format import read_lora_weights
from loraplex.server.default_model import default_model_path
from loraplex.server.engine import (
    Engine,
    EngineConfig,
    SamplingParams,
    SequenceState,
    attention_cpu,
    cpu_extension,
    nf4_cpu,
)
from loraplex.server.engine.spec import PROJECTIONS
from loraplex.server.model_files import iter_weights, model_spec

RESULTS = Path(__file__).parent / "results" / "engine_throughput.json"
NUM_REQUESTS, PROMPT_LEN, NEW_TOKENS = 32, 64, 64
DECODE_BLOCK = 8  # decode steps a mode runs before the next mode takes over
PREFILL_RUNS = 3  # prefills a mode runs (modes interleaved); its median counts, as a decode step's does
MIXED_RANKS = (8, 16, 32, 64)
SAMPLED = {"temperature": 0.8, "top_p": 0.95}
"""Mode (f)'s sampling: what a chat client typically asks for."""


def tiny_model(folder: Path) -> Path:
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


def write_adapters(base_folder: Path, folder: Path, ranks: list[int],
                   targets: Sequence[str] = PROJECTIONS) -> list[Path]:
    """PEFT LoRA adapters on `targets` (default: all linear layers) with random non-zero weights, one folder each."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    names = [f"adapter{i:02d}_r{r}" for i, r in enumerate(ranks)]
    configs = [LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False)
               for r in ranks]
    model = get_peft_model(base, configs[0], adapter_name=names[0])
    for name, config in zip(names[1:], configs[1:], strict=True):
        model.add_adapter(name, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)
    model.save_pretrained(folder)
    return [folder / name for name in names]


def measure_bandwidth() -> float:
    """Bytes/s of a large copy (read + write counted)."""
    src = torch.ones(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def measure_matmul_rate() -> float:
    """FLOP/s of a large float32 matmul."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best


#: A mode: the engine it runs on and one adapter slot per request (-1: the base model).
Mode = tuple[Engine, list[int]]


def warm_up(prompts: list[list[int]], modes: dict[str, Mode]) -> None:
    """One prefill and a few decode steps of every mode, discarded: first calls pay for kernel
    builds, allocator growth and BLAS setup for new shapes."""
    for engine, slots in modes.values():
        engine.generate(prompts[:len(slots)], SamplingParams(max_new_tokens=3, ignore_eos=True), slots)


def run_engine_modes(prompts: list[list[int]], modes: dict[str, Mode], sampled: Collection[str] = ()
                     ) -> dict[str, dict]:
    """Run every mode's batch (the first len(slots) prompts), interleaved in blocks of decode steps, so
    that the machine's drift (other tenants, clocks) falls on all modes alike. Modes in `sampled`
    sample (SAMPLED: temperature, top-p, a seed per request); the others decode greedily.

    Per mode: tokens/s = generated tokens / (median prefill + decode steps x median decode step time):
    the medians keep a step stalled by another tenant of this shared machine from deciding a ratio (the
    prefill, a quarter of the time, is run PREFILL_RUNS times, the last batch's decoding on). The plain
    wall-clock figure (last prefill + every decode step) is kept as `wall_tokens_per_s`.
    """
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)

    def sampling(mode: str, row: int) -> SamplingParams:
        return replace(greedy, **SAMPLED, seed=row) if mode in sampled else greedy

    def new_batch(mode: str) -> list[SequenceState]:
        engine, slots = modes[mode]
        return [engine.add_sequence(p, sampling(mode, row), s)
                for row, (p, s) in enumerate(zip(prompts, slots, strict=False))]

    elapsed = dict.fromkeys(modes, 0.0)
    batches, prefills, steps = {}, {mode: [] for mode in modes}, {mode: [] for mode in modes}
    for run in range(PREFILL_RUNS):
        for mode in modes:
            seqs = new_batch(mode)
            start = time.perf_counter()
            modes[mode][0].step([(s, s.num_pending) for s in seqs])
            prefills[mode].append(time.perf_counter() - start)
            if run < PREFILL_RUNS - 1:
                for seq in seqs:
                    modes[mode][0].release(seq)
            else:
                batches[mode], elapsed[mode] = seqs, prefills[mode][-1]
    prefill = {mode: statistics.median(times) for mode, times in prefills.items()}
    while not all(seqs[0].finished for seqs in batches.values()):
        for mode, seqs in batches.items():
            for _ in range(DECODE_BLOCK):
                if seqs[0].finished:
                    break
                start = time.perf_counter()
                modes[mode][0].step([(s, 1) for s in seqs])
                steps[mode].append(time.perf_counter() - start)
                elapsed[mode] += steps[mode][-1]
    results = {}
    for mode in modes:
        median_step = statistics.median(steps[mode])
        generated = len(batches[mode]) * NEW_TOKENS
        results[mode] = {
            "requests": len(batches[mode]),
            "tokens_per_s": generated / (prefill[mode] + len(steps[mode]) * median_step),
            "wall_tokens_per_s": generated / elapsed[mode],
            "prefill_s": prefill[mode],
            "prefill_runs_s": prefills[mode],
            "decode_step_s": median_step,
        }
    return results


def profile_decode(engine: Engine, prompts: list[list[int]], slots: list[int], steps: int = 12) -> dict:
    """Where one decode step's time goes: the LoRA op (all 7 projections x layers) vs the rest. The op is timed
    through a wrapper, so it runs as its own calls here (the model fuses only the unwrapped CPU op into the NF4
    kernel's call: DecoderLayer._project): this step is the unfused one."""
    lora_time = [0.0]
    op = engine.model.lora_op

    def timed_op(ys, x, lora_slots, batch):
        start = time.perf_counter()
        result = op(ys, x, lora_slots, batch)
        lora_time[0] += time.perf_counter() - start
        return result

    engine.model.lora_op = timed_op
    try:
        seqs = [engine.add_sequence(p, SamplingParams(max_new_tokens=steps + 1, ignore_eos=True), s)
                for p, s in zip(prompts, slots, strict=True)]
        engine.step([(s, s.num_pending) for s in seqs])
        lora_time[0], start = 0.0, time.perf_counter()
        while not seqs[0].finished:
            engine.step([(s, 1) for s in seqs])
        step = (time.perf_counter() - start) / steps
    finally:
        engine.model.lora_op = op
    return {"decode_step_s": step, "lora_op_s": lora_time[0] / steps}


def profile_ops(engine: Engine, prompts: list[list[int]], slots: list[int], steps: int = 8, top: int = 8) -> list:
    """The `top` ops of a decode step by self CPU time, as (name, % of the step): torch's profiler,
    with the fused NF4 kernel, the CPU decode attention and the LoRA op named (they are not aten ops)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def named(name: str, fn):
        def call(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)
        return call

    seqs = [engine.add_sequence(p, SamplingParams(max_new_tokens=steps + 1, ignore_eos=True), s)
            for p, s in zip(prompts, slots, strict=False)]
    engine.step([(s, s.num_pending) for s in seqs])
    fused, group = nf4_cpu.nf4_linear, nf4_cpu.Nf4Group.__call__
    head, attend = nf4_cpu.dense_linear, attention_cpu.decode_attention
    nf4_cpu.nf4_linear = named("loraplex::nf4_linear", fused)  # BaseLinear and the model look them up per call
    nf4_cpu.Nf4Group.__call__ = named("loraplex::nf4_linear", group)  # (q, k, v and gate, up: one call each)
    nf4_cpu.dense_linear = named("loraplex::dense_linear (lm_head)", head)
    attention_cpu.decode_attention = named("loraplex::decode_attention", attend)
    op, engine.model.lora_op = engine.model.lora_op, named(f"loraplex::lora_{engine.lora_impl}", engine.model.lora_op)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            while not seqs[0].finished:
                engine.step([(s, 1) for s in seqs])
            total_us = (time.perf_counter() - start) * 1e6
    finally:
        engine.model.lora_op = op
        nf4_cpu.nf4_linear, nf4_cpu.Nf4Group.__call__ = fused, group
        nf4_cpu.dense_linear, attention_cpu.decode_attention = head, attend
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [(e.key, 100 * e.self_cpu_time_total / total_us) for e in events[:top]]
    return [*rows, ("(python and the rest)", 100 - 100 * sum(e.self_cpu_time_total for e in events) / total_us)]


def median_time(fn, reps: int = 15) -> float:
    """Median wall time of fn() over `reps` calls, after one discarded call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def projection_microbenchmark(spec, token_counts: Sequence[int] = (1, 8, 32, 48, 64, 128, 512)) -> dict:
    """Median time of one projection of every distinct shape of `spec`, per token count: the fused
    kernel (its own loop below calibrated_blas_min_tokens(), else dequantize + BLAS), its loop and its BLAS path
    forced, bitsandbytes' matmul_4bit, and the dense float32 weight by F.linear and by the kernel's tiles;
    then the same with bfloat16 x (the kernel's bf16 path, see nf4_cpu.bf16_path, and F.linear on the
    dense bf16 weight)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    results = {}
    generator = torch.Generator().manual_seed(0)
    for in_features, out_features in sorted({spec.projection_shape(proj) for proj in PROJECTIONS}):
        weight = torch.randn(out_features, in_features, generator=generator)
        packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        fused, dense = nf4_cpu.Nf4Weight.from_quant_state(packed, state), bnbf.dequantize_4bit(packed, state)
        dense_bf16 = nf4_cpu.nf4_dequantize(fused, bf16=True).to(torch.bfloat16)  # [out, in]
        for tokens in token_counts:
            x = torch.randn(tokens, in_features, generator=generator)
            xb = x.to(torch.bfloat16)
            results[f"{out_features}x{in_features}@{tokens}"] = {
                "fused": median_time(lambda: nf4_cpu.nf4_linear(x, fused)),  # noqa: B023 (timed at once)
                "fused_loop": median_time(lambda: nf4_cpu.nf4_linear(x, fused, blas_min_tokens=10**9)),  # noqa: B023
                "fused_blas": median_time(lambda: nf4_cpu.nf4_linear(x, fused, blas_min_tokens=0)),  # noqa: B023
                "bitsandbytes": median_time(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)),  # noqa: B023
                "dense_fp32": median_time(lambda: torch.nn.functional.linear(x, dense)),  # noqa: B023
                "dense_fp32_tiles": median_time(lambda: nf4_cpu.dense_linear(x, dense)),  # noqa: B023
                "fused_bf16": median_time(lambda: nf4_cpu.nf4_linear(xb, fused)),  # noqa: B023
                "fused_bf16_loop": median_time(lambda: nf4_cpu.nf4_linear(xb, fused, blas_min_tokens=10**9)),  # noqa: B023
                "fused_bf16_blas": median_time(lambda: nf4_cpu.nf4_linear(xb, fused, blas_min_tokens=0)),  # noqa: B023
                "dense_bf16": median_time(lambda: torch.nn.functional.linear(xb, dense_bf16)),  # noqa: B023
            }
    return results


def lm_head_microbenchmark(spec, token_counts: Sequence[int] = (1, 8, 32, 64, 128)) -> dict:
    """Median time of the float32 lm_head [vocab, hidden] per row count: F.linear (BLAS) vs the
    kernel's tiles (`nf4_cpu.dense_linear`, which the model uses up to DENSE_MAX_TOKENS rows), reading the
    weight as float32 and as bfloat16 (the model's way when its values are all bf16, as SmolLM2's: same bits)."""
    generator = torch.Generator().manual_seed(0)
    head = torch.randn(spec.vocab_size, spec.hidden_size, generator=generator).bfloat16()  # [vocab, hidden]
    head, head_bf16 = head.float(), head
    results = {}
    for tokens in token_counts:
        x = torch.randn(tokens, spec.hidden_size, generator=generator)
        results[f"{spec.vocab_size}x{spec.hidden_size}@{tokens}"] = {
            "F.linear": median_time(lambda: torch.nn.functional.linear(x, head)),  # noqa: B023
            "tiles": median_time(lambda: nf4_cpu.dense_linear(x, head)),  # noqa: B023
            "tiles_bf16": median_time(lambda: nf4_cpu.dense_linear(x, head_bf16)),  # noqa: B023
        }
    return results


def run_peft(base_folder: Path, adapter_folders: list[Path], prompts: list[list[int]], dtype: torch.dtype,
             device: str) -> dict:
    """transformers + PEFT on the same NF4 base: one generate() with a different adapter per row."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=dtype, quantization_config=nf4_config(dtype),
                                                device_map=device)
    names = [f.name for f in adapter_folders]
    model = PeftModel.from_pretrained(base, adapter_folders[0], adapter_name=names[0])
    for folder, name in zip(adapter_folders[1:], names[1:], strict=True):
        model.load_adapter(folder, adapter_name=name)
    model.eval()
    use_portable_nf4_path(model)  # the NF4 numerics every CPU gets (see bnb_compat)
    inputs = torch.tensor(prompts, device=device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), adapter_names=names,
                       max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return {"tokens_per_s": NUM_REQUESTS * NEW_TOKENS / (time.perf_counter() - start)}


def lora_floor(adapters: list[dict], bandwidth: float, matmul_rate: float) -> dict:
    """Physical floor of one decode step's LoRA work in mode (c): every adapter's weights read once,
    plus the FLOPs of x@A and h@B for one token per adapter."""
    weight_bytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                       for w in adapters for a, b, _ in w.values())
    flops = sum(2 * a.shape[0] * (a.shape[1] + b.shape[0]) for w in adapters for a, b, _ in w.values())
    return {"adapter_bytes": weight_bytes, "flops": flops,
            "floor_s": weight_bytes / bandwidth + flops / matmul_rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="random tiny llama instead of SmolLM2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-peft", action="store_true", help="leave out mode (e)")
    parser.add_argument("--output", type=Path, default=RESULTS,
                        help="the JSON file; on CUDA its folder gets engine_throughput_cuda_<shape>.json")
    parser.add_argument("--shapes", nargs="+", default=["smollm2", "llama3-8b"],
                        help="on CUDA: random-weight models of these shapes (engine_throughput_cuda.SHAPES)")
    args = parser.parse_args()
    if args.device.startswith("cuda"):  # the GPU set: engine_throughput_cuda.py
        from engine_throughput_cuda import run

        for shape in args.shapes:
            run(shape, args.device, args.output.with_name(f"engine_throughput_cuda_{shape}.json"))
        return

    workdir = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    base_folder = tiny_model(workdir / "base") if args.tiny else default_model_path()
    spec = model_spec(base_folder)
    distinct = write_adapters(base_folder, workdir / "r16", [16] * NUM_REQUESTS)
    mixed = write_adapters(base_folder, workdir / "mixed", [MIXED_RANKS[i % 4] for i in range(NUM_REQUESTS)])
    engine = Engine(spec, iter_weights(base_folder),
                    EngineConfig(device=args.device, num_slots=2 * NUM_REQUESTS, max_rank=max(MIXED_RANKS),
                                 kv_cache_bytes=3 * 2**29))  # the modes' sequences live at once
    side = {"device": args.device, "num_slots": 1, "max_rank": 8, "kv_cache_bytes": 2**29}
    dense = Engine(spec, iter_weights(base_folder), EngineConfig(quantize=False, **side))
    portable = Engine(spec, iter_weights(base_folder), EngineConfig(nf4_kernel="bitsandbytes", **side))
    bf16 = Engine(spec, iter_weights(base_folder), EngineConfig(compute_dtype="bfloat16", **{
        **side, "num_slots": NUM_REQUESTS, "max_rank": 16, "kv_cache_bytes": 2**30}))
    dtype = engine.dtype
    distinct_weights = [read_lora_weights(f, dtype) for f in distinct]
    for slot, folder in enumerate(distinct):
        bf16.set_slot(slot, read_lora_weights(folder, bf16.dtype))
    for slot, weights in enumerate(distinct_weights):
        engine.set_slot(slot, weights)
    for slot, folder in enumerate(mixed, start=NUM_REQUESTS):
        engine.set_slot(slot, read_lora_weights(folder, dtype))

    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, spec.vocab_size, (NUM_REQUESTS, PROMPT_LEN), generator=generator).tolist()
    base = [-1] * NUM_REQUESTS
    modes: dict[str, Mode] = {
        "a_base": (engine, base),
        "b_one_adapter": (engine, [0] * NUM_REQUESTS),
        "c_distinct_r16": (engine, list(range(NUM_REQUESTS))),
        "d_mixed_ranks": (engine, list(range(NUM_REQUESTS, 2 * NUM_REQUESTS))),
        "f_base_sampled": (engine, base),
        "g_dense_fp32": (dense, base),
        "h_distinct8_r16": (engine, [i % 8 for i in range(NUM_REQUESTS)]),
        "a_base_batch8": (engine, base[:8]),
        "g_dense_fp32_batch8": (dense, base[:8]),
        "a_base_batch1": (engine, base[:1]),
        "g_dense_fp32_batch1": (dense, base[:1]),
        "a_base_bitsandbytes": (portable, base),
        "a_base_bitsandbytes_batch8": (portable, base[:8]),
        "a_base_bf16": (bf16, base),
        "a_base_bf16_batch8": (bf16, base[:8]),
        "a_base_bf16_batch1": (bf16, base[:1]),
        "c_distinct_r16_bf16": (bf16, list(range(NUM_REQUESTS))),
    }
    warm_up(prompts, modes)
    results = run_engine_modes(prompts, modes, sampled={"f_base_sampled"})
    profile = {mode: profile_decode(engine, prompts, modes[mode][1]) for mode in ("a_base", "c_distinct_r16")}
    op_profile = {mode: profile_ops(modes[mode][0], prompts, modes[mode][1])
                  for mode in ("a_base", "a_base_batch8", "a_base_bf16")}
    del dense, portable, bf16
    micro, head_micro = projection_microbenchmark(spec), lm_head_microbenchmark(spec)
    if not args.skip_peft:
        results["e_peft"] = run_peft(base_folder, distinct, prompts, dtype, args.device)

    bandwidth, matmul_rate = measure_bandwidth(), measure_matmul_rate()
    floor = lora_floor(distinct_weights, bandwidth, matmul_rate)
    base_bytes = engine.model.base_linear_bytes()
    bf16_bytes = sum(2 * p.base.in_features * p.base.out_features for _, _, p in engine.model.projections())
    tps = {mode: r["tokens_per_s"] for mode, r in results.items()}

    def micro_ratio(numerator: str, denominator: str, tokens: int) -> float:
        """Median over the projection shapes of numerator time / denominator time at `tokens` rows."""
        return statistics.median(t[numerator] / t[denominator] for key, t in micro.items()
                                 if key.endswith(f"@{tokens}"))

    ratios = {
        "shared_vs_base": tps["b_one_adapter"] / tps["a_base"],
        "distinct_vs_base": tps["c_distinct_r16"] / tps["a_base"],
        "distinct8_vs_base": tps["h_distinct8_r16"] / tps["a_base"],
        "mixed_ranks_vs_base": tps["d_mixed_ranks"] / tps["a_base"],
        "sampled_vs_greedy": tps["f_base_sampled"] / tps["a_base"],
        "nf4_vs_dense_fp32": tps["a_base"] / tps["g_dense_fp32"],
        "nf4_vs_dense_fp32_batch8": tps["a_base_batch8"] / tps["g_dense_fp32_batch8"],
        "nf4_vs_dense_fp32_batch1": tps["a_base_batch1"] / tps["g_dense_fp32_batch1"],
        "fused_vs_bitsandbytes_engine": tps["a_base"] / tps["a_base_bitsandbytes"],
        "fused_vs_bitsandbytes_engine_batch8": tps["a_base_batch8"] / tps["a_base_bitsandbytes_batch8"],
        "bf16_vs_fp32": tps["a_base_bf16"] / tps["a_base"],
        "bf16_vs_fp32_batch8": tps["a_base_bf16_batch8"] / tps["a_base_batch8"],
        "bf16_vs_fp32_batch1": tps["a_base_bf16_batch1"] / tps["a_base_batch1"],
        "bf16_distinct_vs_fp32_distinct": tps["c_distinct_r16_bf16"] / tps["c_distinct_r16"],
        "fused_bf16_vs_dense_bf16_32": micro_ratio("dense_bf16", "fused_bf16", 32),
        "fused_bf16_vs_fused_fp32_32": micro_ratio("fused", "fused_bf16", 32),
        "fused_vs_bitsandbytes_32": micro_ratio("bitsandbytes", "fused", 32),
        "fused_vs_bitsandbytes_1": micro_ratio("bitsandbytes", "fused", 1),
        "lora_overhead_vs_floor": (results["c_distinct_r16"]["decode_step_s"] - results["a_base"]["decode_step_s"])
        / floor["floor_s"],
        "nf4_linear_bytes_vs_bf16": base_bytes / bf16_bytes,
    }
    if "e_peft" in tps:
        ratios["distinct_vs_peft"] = tps["c_distinct_r16"] / tps["e_peft"]

    print(f"\nmodel: {'tiny llama' if args.tiny else 'SmolLM2-135M-Instruct'}  device: {args.device}  "
          f"dtype: {dtype}  lora: {engine.lora_impl}  threads: {torch.get_num_threads()}")
    print(f"requests of {PROMPT_LEN} prompt + {NEW_TOKENS} new tokens")
    print(f"{'mode':<28}{'requests':>9}{'tokens/s':>10}{'vs base':>9}{'decode step ms':>16}")
    for mode, r in results.items():
        step = f"{r['decode_step_s'] * 1e3:.1f}" if "decode_step_s" in r else "-"
        print(f"{mode:<28}{r.get('requests', NUM_REQUESTS):>9}{r['tokens_per_s']:>10.1f}"
              f"{r['tokens_per_s'] / tps['a_base']:>9.2f}{step:>16}")
    print(f"\n{'projection@tokens':<20}" + "".join(f"{name:>17}" for name in next(iter(micro.values()))) + "  (us)")
    for key, times in micro.items():
        print(f"{key:<20}" + "".join(f"{t * 1e6:>17.0f}" for t in times.values()))
    print(f"\n{'lm_head@rows':<20}" + "".join(f"{name:>14}" for name in next(iter(head_micro.values()))) + "  (us)")
    for key, times in head_micro.items():
        print(f"{key:<20}" + "".join(f"{t * 1e6:>14.0f}" for t in times.values()))
    for mode, rows in op_profile.items():
        print(f"\ndecode step of {mode}, top ops by self CPU time:")
        for name, share in rows:
            print(f"  {share:5.1f}%  {name}")
    print(f"bandwidth {bandwidth / 1e9:.1f} GB/s, matmul {matmul_rate / 1e9:.1f} GFLOP/s; (c) LoRA floor "
          f"{floor['floor_s'] * 1e3:.1f} ms/step ({floor['adapter_bytes'] / 2**20:.0f} MiB of adapters)")
    for mode, p in profile.items():
        print(f"profile {mode}: decode step {p['decode_step_s'] * 1e3:.1f} ms, of which LoRA op "
              f"{p['lora_op_s'] * 1e3:.1f} ms")
    print(f"NF4 base linear bytes {base_bytes / 2**20:.1f} MiB = {ratios['nf4_linear_bytes_vs_bf16']:.3f}x bf16")
    for name, value in ratios.items():
        print(f"  {name:<26}{value:8.3f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "model": "tiny" if args.tiny else "SmolLM2-135M-Instruct", "device": args.device, "dtype": str(dtype),
        "lora_impl": engine.lora_impl,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
                      if f in cpu_extension.cpu_flags().split()],
        "nf4_blas_min_tokens": nf4_cpu.calibrated_blas_min_tokens(),
        "nf4_bf16_blas_min_tokens": nf4_cpu.BF16_BLAS_MIN_TOKENS,
        "nf4_bf16_path": nf4_cpu.bf16_path(),
        "tokens_per_s": tps, "ratios": ratios, "modes": results, "floor": floor, "profile": profile,
        "decode_op_profile_percent": op_profile, "projection_microbenchmark_s": micro,
        "lm_head_microbenchmark_s": head_micro,
        "bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": matmul_rate,
        "nf4_linear_bytes": base_bytes, "bf16_linear_bytes": bf16_bytes,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
