"""Reading a JSON file a user hands us, with an error that names the file and what it should be."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Type

from .errors import FastDragError, InputError


def read_json(file: Path, what: str, error: Type[FastDragError] = InputError, hint: str = "") -> Any:
    """The parsed contents of `file`; `error` saying '{what} {file} does not exist{hint}' or 'is not valid JSON'."""
    file = Path(file)
    if not file.is_file():
        raise error(f"{what} {file} does not exist{hint}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{what} {file} is not valid JSON: {exc}") from exc
