"""Building the compiled CPU kernels: a build killed midway (its torch lock file left behind) does not make the
next process wait forever."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
import sys
from loraplex.server.engine import cpu_extension
source = "int64_t answer() { return 42; }\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def(\"answer\", &answer); }\n"
assert cpu_extension.build("answer", source).answer() == 42
folder = cpu_extension.build_folder("answer", source, ["-O3", "-march=native", "-fopenmp"])
(folder / cpu_extension.TORCH_LOCK).write_text("")  # what a build killed midway leaves behind
assert cpu_extension.build("answer", source).answer() == 42
assert not (folder / cpu_extension.TORCH_LOCK).exists()
print("built twice")
"""


def test_a_lock_file_left_by_a_killed_build_is_cleared_by_the_next_build(tmp_path) -> None:
    env = {**os.environ, "LORAPLEX_HOME": str(tmp_path)}
    env.pop("LORAPLEX_DISABLE_CPU_KERNEL", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "built twice"
