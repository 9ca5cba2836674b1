"""Where the tiny model generator lives, how to run it, and the id tests load it as."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATOR = REPO_ROOT / "fixtures" / "tiny_model" / "make_tiny_model.py"
# What the worker advertises for models/mlx-worker/tiny-llama (the last two path components).
MODEL_ID = "mlx-worker/tiny-llama"
# The same model loaded a second time with batch size 1: the sequential path.
SERIAL_MODEL_ID = "mlx-worker/tiny-llama-serial"


def build_tiny_model(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
