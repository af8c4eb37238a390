"""The real Keras 3.15 configs in tests/fixtures/keras, and lookups into them."""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "keras"


def keras_envelopes(module: str) -> list[dict]:
    """Every envelope of `module` (e.g. `"keras.initializers"`) in the fixtures."""
    assert FIXTURES.is_dir(), f"missing Keras fixtures at {FIXTURES}"
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("module") == module and "class_name" in node:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted(FIXTURES.glob("*.json")):
        walk(json.loads(path.read_text()))
    return found
