"""cpu_memory.keep_freed_memory: a prefill's activations come back without page faults.

Each case runs in a child process (the setting is process-wide and cannot be undone): an engine on a random llama
wide enough that a 2048-token prefill's MLP activations are 16 MiB tensors, four prefills, and the page faults of
each. glibc's defaults map and fault such blocks afresh on every step; kept, the last prefills fault almost none.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from loraplex.server.engine import cpu_memory

_CHILD = """
import json, resource, sys, torch
from pathlib import Path
from loraplex.server.engine import Engine, EngineConfig, SamplingParams, cpu_memory
from loraplex.server.model_files import iter_weights, model_spec
if sys.argv[2] == "default":
    cpu_memory.keep_freed_memory = lambda: False  # what the engine would set: glibc's defaults stay
spec = model_spec(Path(sys.argv[1]))
engine = Engine(spec, iter_weights(Path(sys.argv[1])), EngineConfig(num_slots=1, max_rank=8, kv_cache_bytes=2**27))
prompts = torch.randint(10, spec.vocab_size, (8, 256), generator=torch.Generator().manual_seed(0)).tolist()
faults = []
for _ in range(4):
    seqs = [engine.add_sequence(p, SamplingParams(max_new_tokens=1, ignore_eos=True)) for p in prompts]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    engine.step([(s, s.num_pending) for s in seqs])  # 2048 prompt tokens
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def prefill_faults(model: Path, mode: str) -> list[int]:
    result = subprocess.run([sys.executable, "-c", _CHILD, str(model), mode], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_prefills_reuse_the_memory_the_last_one_freed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    default, kept = prefill_faults(tmp_path, "default"), prefill_faults(tmp_path, "keep")
    # once warm (the last two prefills): glibc's defaults ~20 000-40 000 faults a prefill here, kept 0-1024 (a heap
    # growing by 4 MiB once more)
    assert sum(kept[2:]) * 10 < sum(default[2:])


def test_keeping_is_set_once() -> None:
    assert cpu_memory.keep_freed_memory() is cpu_memory.keep_freed_memory()
