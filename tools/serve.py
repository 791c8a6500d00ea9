"""Serve a model behind an OpenAI-compatible API (see mindsft/server.py; --help lists the flags)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindsft.server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
