"""Training cost of QLoRA vs LoRA (issue: training sidecar): tokens/s and peak memory of the same job
on the NF4 base (as serve-train trains, and the server holds it) and on the unquantized base.

The job, identical for both configurations: SmolLM2-135M-Instruct (the default model), a LoRA r=16,
alpha 32, dropout 0.05 on all linear projections (serve-train's defaults), AdamW (lr 2e-4), batches of 8
order-extraction examples (examples/order_extraction/make_data.py, seed 0) in serve-train's example order
(`ExampleOrder`, seed 0), torch seeded before the LoRA is added (same initial A, same dropout masks).
One training step is what `serve-train` does per micro-batch: the batch moved to the device, forward
with labels, `loss.backward()`, `loss.item()`, `optimizer.step()`, `optimizer.zero_grad()`.

Each run is its own subprocess (so that peak memory of one configuration never mixes with the other's):
it loads the base (`adapters.qlora.load_base`, quantize or not; float32 on CPU, bfloat16 on CUDA as
serve-train uses), adds the LoRA (`adapters.qlora.add_lora`), runs WARMUP steps (discarded: first calls
pay for allocator growth and kernel setup) then STEPS timed ones. tokens/s = non-padding tokens of the
timed steps / their summed step time. Runs alternate (Q L, L Q, ...) so that the drift of this shared
machine falls on both; per configuration the median over runs is quoted, and the ratios are of medians.

Memory, per run:
  - CPU: peak resident set size of the whole subprocess (imports, loading, training): VmHWM of
    /proc/self/status where Linux has it, which counts this program's image only (ru_maxrss, also
    recorded, inherits the launching process's RSS across fork/exec), else ru_maxrss; and the peak
    during the training steps alone (VmHWM reset through /proc/self/clear_refs before them);
  - CUDA: torch.cuda.max_memory_allocated over the whole run, and during the training steps alone;
  - the base's bytes: parameters, buffers and NF4 quantization state (absmax, code; double-quantized
    statistics) of the model before the LoRA, NF4 vs dense.

    python benchmarks/training.py            # the full run: 3 runs per configuration, ~5-8 minutes on 2 cores
    python benchmarks/training.py --quick    # 1 run each, fewer steps: a smoke run (under 2 minutes)

Writes benchmarks/results/training.json: `ratios.qlora_vs_lora_tokens_per_s` and
`ratios.qlora_vs_lora_peak_memory` (QLoRA over LoRA; the absolute figures are there too).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "training.json"
MAKE_DATA = Path(__file__).parents[1] / "examples" / "order_extraction" / "make_data.py"
CONFIGS = {"qlora": True, "lora": False}  # name: quantize the base
BATCH_SIZE, RANK, ALPHA, DROPOUT, TARGETS = 8, 16, 32.0, 0.05, "all-linear"
LEARNING_RATE, SEED, MAX_LENGTH = 2e-4, 0, 512
TRAIN_EXAMPLES = 200  # more than (warm-up + timed steps) x batch size: no example repeats within a run


@dataclass(frozen=True)
class Sizes:
    warmup: int
    """Steps per run before the timed ones (discarded)."""
    steps: int
    """Timed steps per run."""
    rounds: int
    """Runs per configuration, alternated (Q L, L Q, ...)."""


FULL = Sizes(warmup=2, steps=6, rounds=3)
QUICK = Sizes(warmup=1, steps=2, rounds=1)


# -- one run, in its own process ---------------------------------------------------------------------


def rss_status(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: "5" into /proc/self/clear_refs); whether it could."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def model_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of `model`'s parameters and buffers (tied ones once) and of the NF4 quantization state."""
    tensors = {id(t): t for t in chain(model.parameters(), model.buffers())}
    dense = sum(t.numel() * t.element_size() for t in tensors.values())
    states = {}
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        while state is not None:  # the state, then its double-quantized statistics (state2)
            for t in (state.absmax, state.code, state.offset):
                if isinstance(t, torch.Tensor):
                    states[id(t)] = t
            state = getattr(state, "state2", None)
    quant = sum(t.numel() * t.element_size() for t in states.values())
    return {"parameters_and_buffers": dense, "quant_state": quant, "total": dense + quant}


def run_once(config: str, data: Path, device_name: str, sizes: Sizes, gradient_checkpointing: bool) -> dict:
    """Load, add the LoRA, train sizes.warmup + sizes.steps steps; the figures of the timed ones."""
    from transformers import AutoTokenizer

    from loraplex.adapters.qlora import LoraSettings, add_lora, load_base
    from loraplex.adapters.train_data import IGNORE_INDEX, collate, pad_id, read_examples
    from loraplex.adapters.trainer import ExampleOrder
    from loraplex.server.default_model import default_model_path

    folder = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples, _ = read_examples(data / "train.jsonl", tokenizer, MAX_LENGTH)
    order, pad = ExampleOrder(len(examples), SEED), pad_id(tokenizer)
    batches = [collate([examples[i] for i in order.take(s * BATCH_SIZE, (s + 1) * BATCH_SIZE)], pad)
               for s in range(sizes.warmup + sizes.steps)]  # the same batches, in the same order, in every run

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # as serve-train
    rss_before_load = rss_status("VmRSS")
    start = time.perf_counter()
    base = load_base(folder, CONFIGS[config], device, dtype)
    load_s = time.perf_counter() - start
    base_bytes = model_bytes(base)
    torch.manual_seed(SEED)  # same LoRA A initialization and dropout masks in both configurations
    model = add_lora(base, LoraSettings(RANK, ALPHA, DROPOUT, TARGETS), gradient_checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0)
    model.train()
    rss_loaded = rss_status("VmRSS")
    train_peak_reset = reset_peak_rss()
    if cuda:
        torch.cuda.synchronize(device)
        cuda_loaded = torch.cuda.memory_allocated(device)
        cuda_peak_load = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)

    step_s, tokens, loss_tokens, losses = [], [], [], []
    for i, cpu_batch in enumerate(batches):
        start = time.perf_counter()
        batch = {key: value.to(device) for key, value in cpu_batch.items()}  # batch: [B, longest] each
        output = model(**batch)
        output.loss.backward()
        loss = output.loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if i >= sizes.warmup:
            step_s.append(elapsed)
            tokens.append(int(cpu_batch["attention_mask"].sum()))
            loss_tokens.append(int((cpu_batch["labels"] != IGNORE_INDEX).sum()))
            losses.append(loss)

    result = {
        "config": config, "quantized": CONFIGS[config], "dtype": str(dtype), "device": device_name,
        "threads": torch.get_num_threads(), "load_s": load_s,
        "tokens_per_s": sum(tokens) / sum(step_s), "step_s": step_s, "median_step_s": statistics.median(step_s),
        "tokens": tokens, "loss_tokens": loss_tokens, "losses": losses,
        "padded_tokens": [int(b["input_ids"].numel()) for b in batches[sizes.warmup:]],
        "trainable_parameters": sum(p.numel() for p in trainable),
        "base_bytes": base_bytes,
        # ru_maxrss is KiB on Linux (bytes on macOS)
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin"
                                                                                 else 1024),
        "vm_hwm_bytes": rss_status("VmHWM"), "rss_before_load_bytes": rss_before_load,
        "rss_loaded_bytes": rss_loaded,
    }
    # VmHWM counts this program's image only; ru_maxrss also what the launching process held at fork
    result["peak_rss_bytes"] = result["vm_hwm_bytes"] or result["ru_maxrss_bytes"]
    result["train_peak_rss_bytes"] = result["vm_hwm_bytes"] if train_peak_reset else None
    if cuda:
        result.update(cuda_loaded_bytes=cuda_loaded,
                      cuda_peak_bytes=max(cuda_peak_load, torch.cuda.max_memory_allocated(device)),
                      cuda_train_peak_bytes=torch.cuda.max_memory_allocated(device))
    result["peak_memory_bytes"] = result["cuda_peak_bytes"] if cuda else result["peak_rss_bytes"]
    result["loaded_memory_bytes"] = result["cuda_loaded_bytes"] if cuda else result["rss_loaded_bytes"]
    result["train_peak_memory_bytes"] = result["cuda_train_peak_bytes"] if cuda else result["train_peak_rss_bytes"]
    return result


# -- the benchmark: runs alternated, medians, ratios -------------------------------------------------


def make_data(folder: Path) -> Path:
    """The order-extraction task's training file in `folder` (TRAIN_EXAMPLES examples, seed 0)."""
    spec = importlib.util.spec_from_file_location("make_data", MAKE_DATA)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write(folder, TRAIN_EXAMPLES, 8, SEED)
    return folder


def launch(config: str, data: Path, device: str, sizes: Sizes, gradient_checkpointing: bool, workdir: Path,
           index: int) -> dict:
    """One run in a fresh interpreter; its result dict."""
    output = workdir / f"run{index}-{config}.json"
    command = [sys.executable, __file__, "--run", config, "--data", str(data), "--device", device,
               "--warmup", str(sizes.warmup), "--steps", str(sizes.steps), "--run-output", str(output)]
    if gradient_checkpointing:
        command.append("--gradient-checkpointing")
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"run {index} ({config}) failed with exit status {done.returncode}")
    result = json.loads(output.read_text())
    result["process_s"] = time.perf_counter() - start
    return result


def summarize(runs: list[dict]) -> dict:
    """Medians over a configuration's runs."""
    keys = ("tokens_per_s", "median_step_s", "peak_memory_bytes", "train_peak_memory_bytes", "loaded_memory_bytes",
            "peak_rss_bytes", "rss_loaded_bytes", "load_s", "process_s")
    medians = {key: statistics.median(r[key] for r in runs) for key in keys if runs[0].get(key) is not None}
    return {**medians, "mean_loss": statistics.mean(loss for r in runs for loss in r["losses"]),
            "base_bytes": runs[0]["base_bytes"], "trainable_parameters": runs[0]["trainable_parameters"],
            "tokens_per_step": statistics.mean(t for r in runs for t in r["tokens"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps, one run each: a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, help="runs per configuration (default: 3, --quick 1)")
    parser.add_argument("--warmup", type=int, help="discarded steps per run (default: 2, --quick 1)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default: 6, --quick 2)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="as serve-train's flag (default off)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--run", choices=CONFIGS, help=argparse.SUPPRESS)  # one run, in a subprocess
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    base_sizes = QUICK if args.quick else FULL
    sizes = Sizes(warmup=base_sizes.warmup if args.warmup is None else args.warmup,
                  steps=base_sizes.steps if args.steps is None else args.steps,
                  rounds=base_sizes.rounds if args.rounds is None else args.rounds)

    if args.run:
        result = run_once(args.run, args.data, args.device, sizes, args.gradient_checkpointing)
        args.run_output.write_text(json.dumps(result))
        return

    began = time.perf_counter()
    runs: dict[str, list[dict]] = {config: [] for config in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="loraplex-training-bench-") as temp:
        workdir = Path(temp)
        data = make_data(workdir / "data")
        for round_ in range(sizes.rounds):
            for config in (("qlora", "lora") if round_ % 2 == 0 else ("lora", "qlora")):
                run = launch(config, data, args.device, sizes, args.gradient_checkpointing, workdir,
                             len(runs["qlora"]) + len(runs["lora"]))
                runs[config].append(run)
                print(f"  round {round_} {config:<5}: {run['tokens_per_s']:.1f} tokens/s, step "
                      f"{run['median_step_s']:.2f} s, peak {run['peak_memory_bytes'] / 2**20:.0f} MiB "
                      f"({time.perf_counter() - began:.0f} s)", flush=True)

    summary = {config: summarize(rs) for config, rs in runs.items()}
    q, lo = summary["qlora"], summary["lora"]
    ratios = {
        "qlora_vs_lora_tokens_per_s": q["tokens_per_s"] / lo["tokens_per_s"],
        "qlora_vs_lora_peak_memory": q["peak_memory_bytes"] / lo["peak_memory_bytes"],
        "qlora_vs_lora_base_bytes": q["base_bytes"]["total"] / lo["base_bytes"]["total"],
    }
    if q.get("train_peak_memory_bytes") and lo.get("train_peak_memory_bytes"):
        ratios["qlora_vs_lora_train_peak_memory"] = q["train_peak_memory_bytes"] / lo["train_peak_memory_bytes"]
    # per round, the two runs next to each other: how much the machine's noise moves the ratio
    pair_ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["qlora"], runs["lora"], strict=True)]

    memory = "CUDA max allocated" if args.device.startswith("cuda") else "peak RSS"
    dtype = runs["qlora"][0]["dtype"]
    print(f"\nmodel: SmolLM2-135M-Instruct  device: {args.device}  dtype: {dtype}  threads: "
          f"{runs['qlora'][0]['threads']}{'  (--quick: smoke sizes)' if args.quick else ''}")
    print(f"LoRA r={RANK} alpha {ALPHA:g} {TARGETS} dropout {DROPOUT}, AdamW; batch {BATCH_SIZE} "
          f"(~{q['tokens_per_step']:.0f} tokens/step); {sizes.warmup} warm-up + {sizes.steps} timed steps per run; "
          f"medians of {sizes.rounds} run(s) each, alternated")
    print(f"{'config':<7}{'base':>7}{'tokens/s':>10}{'step s':>8}{memory + ' MiB':>20}{'in training':>13}"
          f"{'loaded':>8}{'base MiB':>10}{'loss':>8}")
    for config, s in summary.items():
        train_peak = s.get("train_peak_memory_bytes")
        print(f"{config:<7}{'NF4' if CONFIGS[config] else 'dense':>7}{s['tokens_per_s']:>10.1f}"
              f"{s['median_step_s']:>8.2f}{s['peak_memory_bytes'] / 2**20:>20.0f}"
              f"{(f'{train_peak / 2**20:.0f}' if train_peak else '-'):>13}{s['loaded_memory_bytes'] / 2**20:>8.0f}"
              f"{s['base_bytes']['total'] / 2**20:>10.1f}{s['mean_loss']:>8.4f}")
    print("    in training: the peak during the training steps alone; loaded: once the base, the LoRA and the "
          "optimizer are set up;\n    base: the base model's parameters, buffers and NF4 state; loss: mean training "
          "loss of the timed steps")
    print(f"  per-round tokens/s ratios: {', '.join(f'{r:.3f}' for r in pair_ratios)}")
    for name, value in ratios.items():
        print(f"  {name:<34}{value:7.3f}")
    print(f"total {time.perf_counter() - began:.0f} s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct", "device": args.device, "dtype": dtype, "quick": args.quick,
        "threads": runs["qlora"][0]["threads"], "machine": platform.processor() or platform.machine(),
        "config": {**asdict(sizes), "batch_size": BATCH_SIZE, "rank": RANK, "alpha": ALPHA, "dropout": DROPOUT,
                   "target_modules": TARGETS, "learning_rate": LEARNING_RATE, "seed": SEED, "max_length": MAX_LENGTH,
                   "train_examples": TRAIN_EXAMPLES, "gradient_checkpointing": args.gradient_checkpointing,
                   "memory": memory},
        "ratios": ratios, "per_round_tokens_per_s_ratios": pair_ratios, "medians": summary, "runs": runs,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
