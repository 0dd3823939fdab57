"""serve-train's job: QLoRA on the server's NF4 base, evaluated before and after, stored with a card, and
optionally handed to a running server.

One job, in order: check the inputs (model, data, store) before anything heavy; load the base as the
server quantizes it and add a LoRA; evaluate the base alone (held-out loss, perplexity, generation
score); train (AdamW, warm-up then linear decay, gradient accumulation, checkpoints every N steps;
Ctrl-C saves one and stops); evaluate again; write the adapter and its card into the store (one atomic
version, validated); with --server, ask the server to load it.

Under `torchrun --nproc_per_node=N` every process runs this same function: DDP (gloo on CPU, nccl on
CUDA) over N shards of each micro-batch, so the effective batch (batch_size * grad_accum) and the
number of steps do not depend on N. Process 0 alone evaluates, checkpoints and writes.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoTokenizer

from loraplex.adapters.evaluation import Metrics, evaluate, load_scorer
from loraplex.adapters.peft_format import CONFIG_FILE
from loraplex.adapters.qlora import LoraSettings, add_lora, load_base
from loraplex.adapters.store import AdapterStore, StoredAdapter
from loraplex.adapters.train_config import TrainSettings
from loraplex.adapters.train_data import DataError, Dataset, Example, collate, load_dataset, pad_id
from loraplex.adapters.validation import CARD_FILE, Limits
from loraplex.server.default_model import default_model_path, loraplex_home
from loraplex.server.gguf_model import served_folder
from loraplex.server.model_files import UnsupportedModel, base_digest, model_spec

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "loraplex")
CHECKPOINTS_KEPT = 2
STATE_FILE = "state.json"


class TrainError(RuntimeError):
    """The job cannot run or finish; the message says why and what to do. Nothing was stored."""


class Interrupted(RuntimeError):
    """Ctrl-C (or SIGTERM): a checkpoint was saved; the message says how to resume."""


@dataclass(frozen=True)
class TrainResult:
    stored: StoredAdapter
    base: Metrics
    adapter: Metrics
    steps: int
    wall_time_s: float
    card: dict


@dataclass(frozen=True)
class Process:
    """This process's place in the job: rank among world_size (1 without torchrun), and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: str) -> Process:
        """Join the torchrun group when WORLD_SIZE > 1 (nccl on CUDA, else gloo)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        target = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(rank, world_size, target)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any process."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def train(settings: TrainSettings, log=print) -> TrainResult:
    """Run one job (see the module docstring); TrainError or Interrupted on the way out."""
    started = time.perf_counter()
    process = Process.start(settings.device)
    try:
        folder = served_folder(settings.model) if settings.model is not None else default_model_path()
        spec = model_spec(folder)
    except (UnsupportedModel, OSError, ValueError) as error:
        raise TrainError(f"--model {settings.model or 'default'}: {error}") from None
    store = _open_store(settings, spec)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    try:
        dataset = load_dataset(settings.data, settings.eval_data, tokenizer, settings.max_length,
                               settings.eval_fraction, settings.seed)
    except DataError as error:
        raise TrainError(str(error)) from None
    if settings.batch_size % process.world_size:
        raise TrainError(f"--batch-size {settings.batch_size} does not split over {process.world_size} processes; "
                         "use a multiple of the process count")
    scorer = load_scorer(settings.scorer)
    base_id = base_digest(folder)
    fingerprint = _fingerprint(settings, base_id, dataset.digest)
    work_dir = settings.work_dir or loraplex_home() / "training" / settings.name
    checkpoint = _latest_checkpoint(work_dir, fingerprint) if settings.resume else None

    torch.manual_seed(settings.seed)
    dtype = torch.bfloat16 if process.device.type == "cuda" else torch.float32
    model = add_lora(load_base(folder, settings.quantize, process.device, dtype),
                     LoraSettings(settings.rank, settings.alpha, settings.dropout, settings.lora_targets()),
                     settings.gradient_checkpointing)
    evaluate_now = _evaluator(model, tokenizer, dataset, scorer, settings)
    base_metrics = _main_only(process, lambda: _without_adapter(model, evaluate_now))
    if process.is_main:
        log(f"base: held-out loss {base_metrics.loss:.4f}, perplexity {base_metrics.perplexity:.2f}, "
            f"{settings.scorer} {base_metrics.score:.3f} over {len(dataset.eval)} examples")

    steps = max(1, math.ceil(settings.epochs * len(dataset.train) / (settings.batch_size * settings.grad_accum)))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_decay(steps, settings.warmup_ratio))
    first_step = _restore(checkpoint, model, optimizer, schedule) if checkpoint else 0
    if checkpoint:
        log(f"resuming from {checkpoint} at step {first_step} of {steps}")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if process.world_size > 1 else None
    order = ExampleOrder(len(dataset.train), settings.seed)
    pad = pad_id(tokenizer)

    with _interruptible() as interrupted:
        progress = tqdm(total=steps, initial=first_step, disable=not process.is_main, desc=f"training {settings.name}",
                        unit="step", dynamic_ncols=True)
        model.train()
        for step in range(first_step, steps):
            loss = 0.0
            for micro in range(settings.grad_accum):
                examples = _micro_batch(dataset.train, order, step * settings.grad_accum + micro, settings.batch_size,
                                        process)
                batch = {key: value.to(process.device) for key, value in collate(examples, pad).items()}
                last = micro == settings.grad_accum - 1
                with (ddp.no_sync() if ddp is not None and not last else nullcontext()):
                    output = (ddp or model)(**batch)
                    (output.loss / settings.grad_accum).backward()
                loss += output.loss.item() / settings.grad_accum
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
            done = step + 1
            stop = process.any(interrupted())
            if process.is_main and (stop or done % settings.checkpoint_every == 0) and done < steps:
                _save_checkpoint(work_dir, done, fingerprint, model, optimizer, schedule)
            if stop:
                progress.close()
                raise Interrupted(f"interrupted at step {done} of {steps}; a checkpoint is in {work_dir}: run the "
                                  "same command with --resume to continue")
        progress.close()

    adapter_metrics = _main_only(process, evaluate_now)
    stored, card = None, {}
    if process.is_main:
        card = _card(settings, folder.name, base_id, dataset, base_metrics, adapter_metrics, steps, process,
                     time.perf_counter() - started)
        stored = _store(store, model, card, settings.name)
        shutil.rmtree(work_dir, ignore_errors=True)  # the job is done: its checkpoints are not needed
    process.barrier()
    return TrainResult(stored, base_metrics, adapter_metrics, steps, time.perf_counter() - started, card)


def _warmup_then_decay(steps: int, warmup_ratio: float):
    """Learning-rate factor per step: linear warm-up to 1 over warmup_ratio of the steps, then linear to 0."""
    warmup = round(steps * warmup_ratio)
    return lambda step: (step + 1) / warmup if step < warmup else (steps - step) / max(steps - warmup, 1)


def _open_store(settings: TrainSettings, spec) -> AdapterStore:
    """The adapter store, checked writable before any training (so a job never fails only at the end)."""
    root = settings.store or loraplex_home() / "adapters"
    try:
        store = AdapterStore(root, spec, Limits(max_rank=settings.rank, max_bytes=2**40))
        with store.temp_folder() as probe:
            (probe / "probe").write_bytes(b"")
    except OSError as error:
        raise TrainError(f"cannot write the adapter store {root} ({error.strerror}); fix its permissions or "
                         "pass --store") from None
    return store


def _evaluator(model: PeftModel, tokenizer, dataset: Dataset, scorer, settings: TrainSettings):
    return lambda: evaluate(model, tokenizer, dataset.eval, scorer, settings.eval_batch_size,
                            settings.eval_max_new_tokens)


def _without_adapter(model: PeftModel, run):
    with model.disable_adapter():
        return run()


def _main_only(process: Process, run) -> Metrics | None:
    """`run()` on process 0 (the others wait for it)."""
    result = run() if process.is_main else None
    process.barrier()
    return result


class ExampleOrder:
    """Example indices, epoch after epoch, each epoch its own seeded permutation; any position can be read,
    so a resumed job continues with exactly the examples it would have seen."""

    def __init__(self, count: int, seed: int) -> None:
        self.count, self.seed = count, seed
        self._permutations: dict[int, list[int]] = {}

    def take(self, start: int, stop: int) -> list[int]:
        """The example indices at positions [start, stop)."""
        return [self._permutation(i // self.count)[i % self.count] for i in range(start, stop)]

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._permutations:
            self._permutations = {epoch: random.Random(self.seed * 1_000_003 + epoch).sample(range(self.count),
                                                                                              self.count)}
        return self._permutations[epoch]


def _micro_batch(examples: list[Example], order: ExampleOrder, index: int, batch_size: int,
                 process: Process) -> list[Example]:
    """This process's share of global micro-batch `index` (order positions index*batch_size onwards)."""
    share = batch_size // process.world_size
    start = index * batch_size + process.rank * share
    return [examples[i] for i in order.take(start, start + share)]


@contextmanager
def _interruptible() -> Iterator:
    """SIGINT/SIGTERM set a flag instead of killing the job; yields a function reading it."""
    received: list[int] = []
    handlers = {sig: signal.signal(sig, lambda number, _frame: received.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(received)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _fingerprint(settings: TrainSettings, base: str, data: str) -> dict:
    """What a checkpoint must match to be resumed: base, data and every setting that shapes training."""
    shaping = settings.model_dump(mode="json", exclude={"server", "api_key", "promote_if_better", "resume",
                                                        "work_dir", "store", "checkpoint_every", "device"})
    return {"base_model_digest": base, "data_digest": data, "settings": shaping}


def _save_checkpoint(work_dir: Path, step: int, fingerprint: dict, model: PeftModel, optimizer, schedule) -> None:
    """Write work_dir/checkpoint-STEP atomically (temp folder, rename); keep the last CHECKPOINTS_KEPT."""
    work_dir.mkdir(parents=True, exist_ok=True)
    temp = work_dir / f".tmp-{os.getpid()}-{step}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    save_file(get_peft_model_state_dict(model), temp / "adapter.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "rng": torch.get_rng_state()}, temp / "optimizer.pt")
    (temp / STATE_FILE).write_text(json.dumps({"step": step, **fingerprint}, indent=1))
    temp.rename(work_dir / f"checkpoint-{step:07d}")
    for old in sorted(work_dir.glob("checkpoint-*"))[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(work_dir: Path, fingerprint: dict) -> Path | None:
    """The newest checkpoint in `work_dir`; TrainError if there is none or it belongs to another job."""
    checkpoints = sorted(work_dir.glob("checkpoint-*")) if work_dir.is_dir() else []
    if not checkpoints:
        raise TrainError(f"--resume: no checkpoint in {work_dir}; run without --resume to start afresh")
    state = json.loads((checkpoints[-1] / STATE_FILE).read_text())
    for key, value in fingerprint.items():
        if state.get(key) != value:
            what = key.replace("_", " ")
            raise TrainError(f"--resume: the checkpoint in {checkpoints[-1]} was made with another {what}; resume "
                             "with the same model, data and settings, or run without --resume")
    return checkpoints[-1]


def _restore(checkpoint: Path, model: PeftModel, optimizer, schedule) -> int:
    """Load a checkpoint's LoRA weights, optimizer state and RNG state; the step to continue from."""
    set_peft_model_state_dict(model, load_file(checkpoint / "adapter.safetensors"))
    states = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    schedule.load_state_dict(states["schedule"])
    torch.set_rng_state(states["rng"])  # dropout masks continue as in an uninterrupted run
    return json.loads((checkpoint / STATE_FILE).read_text())["step"]


def _card(settings: TrainSettings, base_name: str, base_id: str, dataset: Dataset, base: Metrics, adapter: Metrics,
          steps: int, process: Process, wall_time_s: float) -> dict:
    return {
        "name": settings.name,
        "base_model": base_name,
        "base_model_digest": base_id,
        "data_digest": dataset.digest,
        "examples": {"train": len(dataset.train), "eval": len(dataset.eval)},
        "hyperparameters": settings.model_dump(mode="json", exclude={"server", "api_key", "promote_if_better",
                                                                      "resume", "work_dir", "store"}),
        "metrics": {"scorer": settings.scorer, "base": base.as_dict(), "adapter": adapter.as_dict()},
        "training": {"steps": steps, "processes": process.world_size, "device": process.device.type,
                     "wall_time_s": round(wall_time_s, 1)},
        "versions": {name: metadata.version(name) for name in LIBRARIES},
    }


def _store(store: AdapterStore, model: PeftModel, card: dict, name: str) -> StoredAdapter:
    """Save the PEFT folder and card, and store them as a version of `name` (validated, atomic)."""
    with store.temp_folder() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        _canonical_config(folder / CONFIG_FILE)
        (folder / CARD_FILE).write_text(json.dumps(card, indent=1))
        return store.put(folder, name)


def _canonical_config(path: Path) -> None:
    """Rewrite PEFT's config with sorted keys and target modules (PEFT lists a set in hash order), so the
    same weights always make the same version digest."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
