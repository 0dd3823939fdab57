"""Structured output's cost: 32 rows with half of them constrained by a JSON schema vs all 32 free, same run.

The engine alone (SmolLM2-135M-Instruct, NF4, as served), 32 requests of PROMPT_LEN prompt tokens and
NEW_TOKENS new tokens each (sampled, seeded, temperature 0.8), prefilled then decoded together. In the
constrained mode rows 0, 2, 4, ... follow ORDER_LIST_SCHEMA (at least 32 order lines, 300+ tokens, so no row
ends early and both modes decode the same number of rows per step) through server/core/grammar.py's xgrammar
matchers: their bitmasks are filled on the engine's mask thread while the forward pass runs and applied to
those rows only. The modes alternate REPEATS times; the figure is generated tokens per second of the whole
run (prefill included), best of the repeats per mode. Writes benchmarks/results/structured_output.json with
ratios.constrained_half_vs_free (the bar: >= 0.9).

    python benchmarks/structured_output.py           # the measurement (a few minutes on 2 cores)
    python benchmarks/structured_output.py --tiny    # 8 rows, 8 tokens, 1 repeat: a quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from loraplex.server.core.calls import Constraint
from loraplex.server.core.grammar import Grammars
from loraplex.server.default_model import default_model_path
from loraplex.server.engine import Engine, EngineConfig, SamplingParams
from loraplex.server.model_files import iter_weights, model_spec

RESULTS = Path(__file__).parent / "results" / "structured_output.json"
ROWS, PROMPT_LEN, NEW_TOKENS, REPEATS = 32, 64, 64, 3
ORDER_LIST_SCHEMA = {
    "type": "array", "minItems": 32,
    "items": {"type": "object", "properties": {"sku": {"type": "string", "maxLength": 8},
                                               "quantity": {"type": "integer", "minimum": 1, "maximum": 99}},
              "required": ["sku", "quantity"], "additionalProperties": False},
}


def run(engine: Engine, grammars: Grammars, prompts: list[list[int]], new_tokens: int, constrained: bool,
        ) -> tuple[float, int]:
    """(seconds, generated tokens) of one batch run to completion; every other row constrained if asked."""
    constraint = Constraint("json_schema", json.dumps(ORDER_LIST_SCHEMA))
    seqs = [engine.add_sequence(prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0.8, seed=row,
                                                       ignore_eos=True),
                                constraint=grammars.matcher(constraint) if constrained and row % 2 == 0 else None)
            for row, prompt in enumerate(prompts)]
    start = time.perf_counter()
    running = list(seqs)
    while running:
        engine.step([(seq, seq.num_pending) for seq in running])
        running = [seq for seq in running if not seq.finished]
    return time.perf_counter() - start, sum(len(seq.output_ids) for seq in seqs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="8 rows, 8 new tokens, one repeat (a quick check)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows, new_tokens, repeats = (8, 8, 1) if args.tiny else (ROWS, NEW_TOKENS, REPEATS)
    folder = default_model_path()
    spec = model_spec(folder)
    engine = Engine(spec, iter_weights(folder), EngineConfig(prefix_cache=False))
    grammars = Grammars(AutoTokenizer.from_pretrained(folder), spec.vocab_size, tuple(spec.eos_token_ids))
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, spec.vocab_size, (PROMPT_LEN,), generator=generator).tolist() for _ in range(rows)]
    run(engine, grammars, prompts[:2], 2, constrained=True)  # warm-up: kernels, the compiled grammar
    best = {"free": 0.0, "constrained_half": 0.0}
    runs = []
    for _ in range(repeats):
        for mode in best:
            seconds, tokens = run(engine, grammars, prompts, new_tokens, constrained=mode != "free")
            runs.append({"mode": mode, "seconds": round(seconds, 3), "tokens": tokens})
            best[mode] = max(best[mode], tokens / seconds)
            print(f"{mode:<17} {tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s")
    ratio = best["constrained_half"] / best["free"]
    print(f"constrained_half_vs_free: {ratio:.3f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "setup": {"rows": rows, "constrained_rows": (rows + 1) // 2, "prompt_len": PROMPT_LEN,
                  "new_tokens": new_tokens, "repeats": repeats, "tiny": args.tiny, "model": folder.name,
                  "grammar_engine": "xgrammar", "schema": ORDER_LIST_SCHEMA, "cpu": platform.processor() or
                  platform.machine(), "threads": torch.get_num_threads()},
        "tokens_per_s": {mode: round(value, 2) for mode, value in best.items()},
        "runs": runs,
        "ratios": {"constrained_half_vs_free": round(ratio, 4)},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
