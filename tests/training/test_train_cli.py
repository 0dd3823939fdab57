"""The `serve-train` console script: --help lists the settings with the guide's defaults and the config file;
missing or bad settings exit 2 with a message naming them, before anything loads."""

import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = shutil.which("serve-train") or str(Path(sys.executable).parent / "serve-train")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_settings_and_their_defaults() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--data", "--name", "--eval-data", "--model", "--server", "--promote-if-better", "--resume",
                 "--gradient-checkpointing", "--grad-accum", "--max-length", "--seed"):
        assert flag in result.stdout, flag
    for default in ("(default: 16)", "(default: 32.0)", "(default: 0.05)", "all-linear"):
        assert default in result.stdout, default
    assert "`--config FILE` (YAML or TOML)" in result.stdout


def test_missing_and_bad_settings_exit_2(tmp_path: Path) -> None:
    missing = run("--name", "x")
    assert missing.returncode == 2 and "data" in missing.stderr and "Field required" in missing.stderr
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": " b"}\n')
    bad_name = run("--data", str(data), "--name", "no spaces")
    assert bad_name.returncode == 2 and "name" in bad_name.stderr and "letters, digits" in bad_name.stderr
