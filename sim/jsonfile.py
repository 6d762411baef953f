"""Reading a JSON file with errors that name it (model configs, cost profiles, report summaries)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path, *, obj: bool = False) -> Any:
    """The parsed contents of ``path``; ``ValueError`` naming the file when it is not valid JSON or, with ``obj``,
    not a JSON object. A missing file is the caller's to report (each names what it expected there)."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if obj and not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
