"""The scripts under deploy/tools/ as modules (deploy/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from support.paths import REPO

DEPLOY = REPO / "deploy"


def load_tool(name: str) -> ModuleType:
    """Import deploy/tools/<name>.py once and return the module."""
    module_name = f"vlltr_deploy_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, DEPLOY / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
