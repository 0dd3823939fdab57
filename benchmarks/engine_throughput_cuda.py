"""The engine on CUDA: decode throughput with 32 distinct adapters vs one shared vs the base, against the
step's memory-bandwidth floor, on random-weight models of real models' shapes built on the fly.

`engine_throughput.py --device cuda` runs this (its CPU measurements, the compiled CPU kernels' micro-
benchmarks and the CPU profiler, do not apply there). Nothing is downloaded: the model's config is
written to a temporary folder and its weights are drawn on the GPU as the engine quantizes them, one
tensor at a time (an 8B model never exists in 16-bit form as a whole), and the adapters are random
LoRA weights of rank 16 on all linear projections (lora_B scaled down as PEFT's zero init would not).

Per shape (--shapes: smollm2 = SmolLM2-135M's, llama3-8b = Llama-3-8B's), modes of 32 requests of
PROMPT_LEN prompt + NEW_TOKENS new tokens, interleaved as engine_throughput.run_engine_modes does:
  a_base (no adapter), b_one_adapter (all 32 on one), c_distinct_r16 (32 distinct), a_base_batch1
then the same base and distinct modes on a second engine with CUDA graphs (engine.cuda_graphs), for
`graphs_vs_eager*`; the figures without graphs are written before that part runs.
The floor of a decode step is the bytes it must read once, over the GPU's measured copy bandwidth:
the NF4 base projections (packed data + quantization state), the lm_head, the distinct adapters' A
and B rows, and the KV cache of every sequence at its mean context length.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from engine_throughput import run_engine_modes, warm_up  # the CPU benchmark's timing loop, shared
from transformers import AutoModelForCausalLM, LlamaConfig

from loraplex.server.engine import Engine, EngineConfig
from loraplex.server.engine.model import LoraWeights
from loraplex.server.engine.spec import PROJECTIONS, ModelSpec
from loraplex.server.model_files import model_spec

NUM_REQUESTS, PROMPT_LEN, NEW_TOKENS, RANK = 32, 64, 64, 16

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}
"""The architectures' shapes (their config.json fields) as LlamaConfig arguments."""


def write_config(shape: str, folder: Path) -> Path:
    """A model folder holding only config.json (the engine's spec is read from it; weights come from
    `random_weights`)."""
    LlamaConfig(**SHAPES[shape]).save_pretrained(folder)
    return folder


def random_weights(folder: Path, device: torch.device, dtype: torch.dtype, seed: int = 0
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every parameter of the model in `folder`, drawn on `device` one at a time:
    norms 1, everything else N(0, 0.02^2). The names and shapes come from transformers' model built on
    the meta device (no memory)."""
    config = LlamaConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("norm.weight"):
            yield name, torch.ones(param.shape, device=device, dtype=dtype)
        else:
            yield name, torch.randn(param.shape, device=device, dtype=dtype, generator=generator) * 0.02


def random_adapters(spec: ModelSpec, count: int, rank: int, device: torch.device, dtype: torch.dtype
                    ) -> list[LoraWeights]:
    """`count` adapters of `rank` on every projection of every layer, random A and small random B."""
    generator = torch.Generator(device=device).manual_seed(1)
    adapters = []
    for _ in range(count):
        weights: LoraWeights = {}
        for layer in range(spec.num_layers):
            for proj in PROJECTIONS:
                in_features, out_features = spec.projection_shape(proj)
                a = torch.randn(rank, in_features, device=device, dtype=dtype, generator=generator) * 0.02
                b = torch.randn(out_features, rank, device=device, dtype=dtype, generator=generator) * 0.002
                weights[(layer, proj)] = (a, b, 2.0)
        adapters.append(weights)
    return adapters


def measure_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted), best of 10."""
    src = torch.ones(2**28, device=device)  # 1 GiB of float32
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def step_bytes(engine: Engine, adapters: list[LoraWeights], num_sequences: int) -> dict:
    """Bytes one decode step of `num_sequences` must read (see the module docstring)."""
    spec = engine.spec
    head = engine.model.lm_head
    adapter_bytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                        for weights in adapters for a, b, _ in weights.values())
    mean_context = PROMPT_LEN + NEW_TOKENS // 2
    kv_bytes = (num_sequences * mean_context * spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
                * engine.dtype.itemsize)
    return {"nf4_base": engine.model.base_linear_bytes(), "lm_head": head.numel() * head.element_size(),
            "adapters": adapter_bytes, "kv": kv_bytes}


def build_engine(folder: Path, device: str, adapters: list[LoraWeights], cuda_graphs: bool) -> Engine:
    """The engine of the model in `folder` on `device`, `adapters` in its first slots."""
    config = EngineConfig(device=device, num_slots=NUM_REQUESTS, max_rank=RANK, kv_cache_bytes=4 * 2**30,
                          cuda_graphs=cuda_graphs)
    engine = Engine(model_spec(folder), random_weights(folder, torch.device(device), config.torch_dtype()), config)
    for slot, weights in enumerate(adapters):
        engine.set_slot(slot, weights)
    return engine


def run(shape: str, device: str, output: Path) -> dict:
    """Measure one shape on `device`; writes and returns the figures."""
    torch_device = torch.device(device)
    folder = write_config(shape, Path(tempfile.mkdtemp(prefix=f"loraplex-{shape}-")))
    spec = model_spec(folder)
    adapters = random_adapters(spec, NUM_REQUESTS, RANK, torch_device, EngineConfig(device=device).torch_dtype())
    engine = build_engine(folder, device, adapters, cuda_graphs=False)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, spec.vocab_size, (NUM_REQUESTS, PROMPT_LEN), generator=generator).tolist()
    base = [-1] * NUM_REQUESTS
    modes = {
        "a_base": (engine, base),
        "b_one_adapter": (engine, [0] * NUM_REQUESTS),
        "c_distinct_r16": (engine, list(range(NUM_REQUESTS))),
        "a_base_batch1": (engine, base[:1]),
    }
    warm_up(prompts, modes)
    results = run_engine_modes(prompts, modes)
    bandwidth = measure_bandwidth(torch_device)
    needed = {"a_base": step_bytes(engine, [], NUM_REQUESTS),
              "c_distinct_r16": step_bytes(engine, adapters, NUM_REQUESTS)}
    floor = {mode: sum(b.values()) / bandwidth for mode, b in needed.items()}
    tps = {mode: r["tokens_per_s"] for mode, r in results.items()}
    ratios = {
        "shared_vs_base": tps["b_one_adapter"] / tps["a_base"],
        "distinct_vs_base": tps["c_distinct_r16"] / tps["a_base"],
        "decode_step_vs_floor_base": results["a_base"]["decode_step_s"] / floor["a_base"],
        "decode_step_vs_floor_distinct": results["c_distinct_r16"]["decode_step_s"] / floor["c_distinct_r16"],
    }
    report = {
        "model": f"random weights, {shape} shapes", "device": torch.cuda.get_device_name(torch_device),
        "torch": torch.__version__, "dtype": str(engine.dtype), "lora_impl": engine.lora_impl,
        "nf4_plan": {"kernel": engine.nf4_plan.kernel, "max_tokens": engine.nf4_plan.max_tokens},
        "tokens_per_s": tps, "ratios": ratios, "modes": results,
        "step_bytes": needed, "floor_s": floor, "bandwidth_bytes_per_s": bandwidth,
    }
    print(f"\n{shape}: {report['device']}, {report['dtype']}, lora {engine.lora_impl}, nf4 {engine.nf4_plan.kernel}")
    for mode, r in results.items():
        print(f"  {mode:<18}{r['requests']:>4} req {r['tokens_per_s']:>10.1f} tokens/s  "
              f"decode step {r['decode_step_s'] * 1e3:7.2f} ms")
    floors = ", ".join(f"{mode} {seconds * 1e3:.2f} ms" for mode, seconds in floor.items())
    print(f"  bandwidth {bandwidth / 1e12:.2f} TB/s; floor {floors}")
    for name, value in ratios.items():
        print(f"  {name:<30}{value:8.3f}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")

    graphed = build_engine(folder, device, adapters, cuda_graphs=True)
    compared = ("a_base", "c_distinct_r16", "a_base_batch1")
    graph_modes = {f"{mode}_graphs": (graphed, modes[mode][1]) for mode in compared}
    warm_up(prompts, graph_modes)
    graph_results = run_engine_modes(prompts, graph_modes)
    report["modes"].update(graph_results)
    report["tokens_per_s"].update({mode: r["tokens_per_s"] for mode, r in graph_results.items()})
    report["cuda_graphs_buckets"] = graphed.decode_graphs.captured
    for mode in compared:
        report["ratios"][f"graphs_vs_eager_{mode}"] = (results[mode]["decode_step_s"]
                                                       / graph_results[f"{mode}_graphs"]["decode_step_s"])
        print(f"  {mode}_graphs: decode step {graph_results[f'{mode}_graphs']['decode_step_s'] * 1e3:7.2f} ms, "
              f"graphs vs eager {report['ratios'][f'graphs_vs_eager_{mode}']:.3f}")
    output.write_text(json.dumps(report, indent=2) + "\n")
    return report
