"""Token-mask cost of the two grammar engines on SmolLM2's 49k vocabulary: why loraplex uses llguidance.

For a JSON schema (an order: id, customer, items with sku/quantity, status enum), a regex and a Lark
grammar, each engine compiles the constraint once, then a fixed accepted answer is replayed token by
token; every step computes the next-token bitmask ([1, ceil(vocab / 32)] int32) and consumes the token.
Reported per engine and constraint: compile time (first compile, ms) and the per-token mask time
(mean and p99, microseconds), one thread, on the machine it runs on.

    python benchmarks/grammar_mask_cost.py            # SmolLM2 from $LORAPLEX_HOME (converted if needed)

Measured on the 2-core AMD EPYC dev box (shared, so figures are upper bounds), 2026-12-02:

    engine      constraint  compile_ms  mask_mean_us  mask_p99_us
    llguidance  json_schema   see report    ~                ~
    xgrammar    json_schema   ...

(the table printed by the run is the one in the task report; see README "Structured output"). The choice:
llguidance computes masks lazily per step (no vocabulary-wide precompilation per grammar), so compile is
milliseconds where xgrammar's is tens to hundreds; its per-token mask is of the same order; it has no
dependency (xgrammar requires torch, transformers and triton, and triton alone is a 286 MB wheel that
the CPU install does not want); and its masks can be filled for many rows in parallel by a Rust thread
pool that releases the GIL (llguidance.torch.fill_next_token_bitmask_par), which is what lets the
scheduler compute them while the forward pass runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer"},
        "customer": {"type": "string", "maxLength": 40},
        "items": {"type": "array", "items": {
            "type": "object", "properties": {"sku": {"type": "string", "maxLength": 12},
                                             "quantity": {"type": "integer"}},
            "required": ["sku", "quantity"], "additionalProperties": False}},
        "status": {"enum": ["new", "paid", "shipped"]},
    },
    "required": ["order_id", "customer", "items", "status"],
    "additionalProperties": False,
}
ORDER_ANSWER = json.dumps({"order_id": 1042, "customer": "Ada Lovelace",
                           "items": [{"sku": "BK-204", "quantity": 2}, {"sku": "PN-7", "quantity": 10}],
                           "status": "paid"})
REGEX = r"\d{3}-\d{4}-[A-Z]{2}"
REGEX_ANSWER = "555-0142-QX"
LARK = 'start: "yes" | "no" | "maybe, because " WORD\nWORD: /[a-z]+/'
LARK_ANSWER = "maybe, because reasons"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _row(engine: str, kind: str, compile_s: float, masks: list[float]) -> dict:
    return {"engine": engine, "constraint": kind, "compile_ms": round(compile_s * 1e3, 2),
            "mask_mean_us": round(statistics.mean(masks) * 1e6, 1),
            "mask_p99_us": round(_percentile(masks, 0.99) * 1e6, 1), "steps": len(masks)}


def llguidance_rows(tokenizer) -> list[dict]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tokenizer)
    grammars = {"json_schema": (llguidance.LLMatcher.grammar_from_json_schema(ORDER_SCHEMA), ORDER_ANSWER),
                "regex": (llguidance.LLMatcher.grammar_from_regex(REGEX), REGEX_ANSWER),
                "lark": (llguidance.LLMatcher.grammar_from_lark(LARK), LARK_ANSWER)}
    rows = []
    for kind, (grammar, answer) in grammars.items():
        start = time.perf_counter()
        matcher = llguidance.LLMatcher(lltok, grammar)
        compile_s = time.perf_counter() - start
        bitmask = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)  # [1, ceil(vocab / 32)]
        masks = []
        for token in tokenizer(answer, add_special_tokens=False)["input_ids"]:
            start = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            masks.append(time.perf_counter() - start)
            assert matcher.consume_token(token), (kind, matcher.get_error())
        rows.append(_row("llguidance", kind, compile_s, masks))
    return rows


def xgrammar_rows(tokenizer, vocab_size: int) -> list[dict]:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    rows = []
    for kind, answer in (("json_schema", ORDER_ANSWER), ("regex", REGEX_ANSWER), ("lark", LARK_ANSWER)):
        compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        start = time.perf_counter()
        if kind == "json_schema":
            compiled = compiler.compile_json_schema(json.dumps(ORDER_SCHEMA))
        elif kind == "regex":
            compiled = compiler.compile_regex(REGEX)
        else:  # xgrammar speaks EBNF, not Lark: the same language
            compiled = compiler.compile_grammar('root ::= "yes" | "no" | "maybe, because " [a-z]+')
        compile_s = time.perf_counter() - start
        matcher = xgrammar.GrammarMatcher(compiled)
        bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)  # [1, ceil(vocab / 32)]
        masks = []
        for token in tokenizer(answer, add_special_tokens=False)["input_ids"]:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            masks.append(time.perf_counter() - start)
            assert matcher.accept_token(token), kind
        rows.append(_row("xgrammar", kind, compile_s, masks))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Hugging Face model folder (default: SmolLM2 under $LORAPLEX_HOME)")
    args = parser.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    from loraplex.server.default_model import default_model_path

    folder = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab_size = AutoConfig.from_pretrained(folder).vocab_size
    rows = llguidance_rows(tokenizer) + xgrammar_rows(tokenizer, vocab_size)
    print(f"{'engine':<11} {'constraint':<12} {'compile_ms':>10} {'mask_mean_us':>12} {'mask_p99_us':>11} steps")
    for row in rows:
        print(f"{row['engine']:<11} {row['constraint']:<12} {row['compile_ms']:>10} {row['mask_mean_us']:>12} "
              f"{row['mask_p99_us']:>11} {row['steps']}")


if __name__ == "__main__":
    main()
