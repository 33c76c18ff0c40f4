"""A run's logs: ``metrics.jsonl`` for programs (one JSON object a line) and ``log.txt`` for people."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, output_dir: str | Path, echo: bool = True):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self._text = open(self.dir / "log.txt", "a", buffering=1)
        self._jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)

    def info(self, message: str) -> None:
        self._text.write(message + "\n")
        if self.echo:
            print(message, flush=True)

    def metrics(self, kind: str, **values: Any) -> None:
        self._jsonl.write(json.dumps({"kind": kind, "time": round(time.time(), 3), **values}) + "\n")

    def close(self) -> None:
        self._text.close()
        self._jsonl.close()
