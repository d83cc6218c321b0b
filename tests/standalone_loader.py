"""`export/standalone.py` loaded from its file, as a service's author runs it: without importing fastdrag."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

STANDALONE = Path(__file__).resolve().parents[1] / "export" / "standalone.py"


def standalone_module() -> ModuleType:
    """`export/standalone.py` as a module (its loops, the model of a C++ service)."""
    spec = importlib.util.spec_from_file_location("standalone", STANDALONE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
