"""`serve-train`: the QLoRA training sidecar's command line (its issue has not landed yet)."""

from __future__ import annotations

import sys


def main() -> None:
    """Say plainly that training is not available in this version, and exit with status 2."""
    print("serve-train: not yet available in this version of loraplex (the training sidecar has not landed)",
          file=sys.stderr)
    sys.exit(2)
