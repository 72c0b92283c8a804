"""llama-cpp-sys harness: builds llama.cpp, prepares models, runs llama-server and drives the bench stages."""

from __future__ import annotations

__version__ = "0.1.0"
