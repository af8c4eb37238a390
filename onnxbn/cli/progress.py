"""The progress display of long command-line runs (`onnxbn bench`)."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """A tqdm bar on stderr, or plain lines on stderr where tqdm is missing."""

    def __init__(self, total: int) -> None:
        try:
            from tqdm import tqdm
        except ImportError:  # a dependency, but a bar is not worth failing a benchmark over
            self._bar: Any = None
            self._done, self._total = 0, total
            return
        self._bar = tqdm(total=total, file=sys.stderr, unit="round", leave=False)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text)
        else:
            print(f"bench: {text} ({self._done}/{self._total})", file=sys.stderr, flush=True)

    def tick(self) -> None:
        if self._bar is not None:
            self._bar.update(1)
        else:
            self._done += 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
