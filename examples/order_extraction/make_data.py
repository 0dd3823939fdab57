"""Write the order-extraction example task: sentences about orders -> one JSON object with fixed fields.

    python examples/order_extraction/make_data.py [--out DIR] [--train 600] [--eval 60] [--seed 0]

writes DIR/train.jsonl and DIR/eval.jsonl (default DIR: this folder's data/) as prompt/completion
lines, e.g.
    prompt:     "Extract the order as JSON.\\nSentence: Maria Lopez ordered 3 desk lamps, to be shipped
                 to Lisbon (order 4821).\\nJSON:"
    completion: ' {"order_id": 4821, "customer": "Maria Lopez", "quantity": 3, "product": "desk lamp",
                 "city": "Lisbon"}'
Train and eval share no sentence. Nothing is downloaded; the same seed writes the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = ["Maria", "John", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Ivan", "Chloe", "Kwame",
         "Sofia", "Liam", "Mei", "Noah", "Elena", "Yusuf", "Anna", "Diego"]
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Fischer", "Silva", "Patel", "Brown", "Khan", "Petrov", "Martin",
        "Mensah", "Rossi", "Walsh", "Chen", "Cohen", "Garcia", "Demir", "Novak", "Ortiz"]
PRODUCTS = ["desk lamp", "office chair", "coffee mug", "laptop stand", "wall clock", "bookshelf", "water bottle",
            "backpack", "keyboard", "monitor", "notebook", "pen set", "table fan", "doormat", "tea kettle",
            "phone case", "yoga mat", "umbrella", "picture frame", "cutting board"]
CITIES = ["Lisbon", "Berlin", "Osaka", "Cairo", "Toronto", "Lima", "Mumbai", "Leeds", "Nairobi", "Oslo", "Seoul",
          "Accra", "Naples", "Dublin", "Austin", "Haifa", "Madrid", "Ankara", "Prague", "Quito"]
TEMPLATES = [
    "{customer} ordered {quantity} {products}, to be shipped to {city} (order {order_id}).",
    "Order {order_id}: {quantity} {products} for {customer} in {city}.",
    "Please send {quantity} {products} to {customer} in {city}; the order number is {order_id}.",
    "{customer} from {city} placed order {order_id} for {quantity} {products}.",
    "Ship {quantity} {products} to {city} for {customer}, reference {order_id}.",
    "We received order #{order_id} from {customer}: {quantity} {products}, delivery to {city}.",
]
INSTRUCTION = "Extract the order as JSON.\nSentence: {sentence}\nJSON:"


def make_example(rng: random.Random) -> tuple[str, dict]:
    """One sentence and the fields it states."""
    fields = {"order_id": rng.randrange(1000, 10000), "customer": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
              "quantity": rng.randrange(1, 13), "product": rng.choice(PRODUCTS), "city": rng.choice(CITIES)}
    plural = fields["product"] + ("" if fields["quantity"] == 1 else "s")
    sentence = rng.choice(TEMPLATES).format(products=plural, **fields)
    return sentence, fields


def record(sentence: str, fields: dict) -> dict:
    return {"prompt": INSTRUCTION.format(sentence=sentence), "completion": " " + json.dumps(fields)}


def write(out: Path, train: int, evaluation: int, seed: int) -> tuple[Path, Path]:
    """Write `train` and `evaluation` distinct examples into out/train.jsonl and out/eval.jsonl."""
    rng = random.Random(seed)
    examples: dict[str, dict] = {}
    while len(examples) < train + evaluation:
        sentence, fields = make_example(rng)
        examples.setdefault(sentence, fields)
    items = list(examples.items())
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "eval.jsonl"
    for path, part in zip(paths, (items[:train], items[train:]), strict=True):
        path.write_text("".join(json.dumps(record(sentence, fields)) + "\n" for sentence, fields in part))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--eval", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write(args.out, args.train, args.eval, args.seed):
        print(path)


if __name__ == "__main__":
    main()
