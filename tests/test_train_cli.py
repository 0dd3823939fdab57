"""The `serve-train` console script exists and says plainly that training has not landed yet."""

import shutil
import subprocess
import sys
from pathlib import Path


def test_serve_train_says_not_yet() -> None:
    script = shutil.which("serve-train") or str(Path(sys.executable).parent / "serve-train")
    result = subprocess.run([script, "--data", "train.jsonl", "--name", "x"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "not yet available" in result.stderr
