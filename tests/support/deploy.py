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


# Flags of the shipped Redis that say where it runs rather than how it persists (a test gives its own).
_PLACEMENT_FLAGS = {"--dir", "--port", "--bind"}


def _persistence_flags(argv: list[str]) -> list[str]:
    flags: list[str] = []
    i = 0
    while i < len(argv):
        flag = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
        if flag not in _PLACEMENT_FLAGS:
            flags.append(flag)
            if value is not None:
                flags.append(value)
        i += 2 if value is not None else 1
    return flags


def compose_redis_flags() -> list[str]:
    """The persistence flags of docker-compose.yml's `redis` service (its command without the program, --dir)."""
    import yaml

    command = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["redis"]["command"]
    assert command[0] == "redis-server", command
    return _persistence_flags([str(c) for c in command[1:]])


def k8s_redis_flags() -> list[str]:
    """The persistence flags of deploy/k8s/redis-statefulset.yaml's Redis container (its args without --dir)."""
    import yaml

    doc = yaml.safe_load((DEPLOY / "k8s" / "redis-statefulset.yaml").read_text())
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return _persistence_flags([str(a) for a in container["args"]])


def shipped_redis_flags() -> list[str]:
    """The Redis persistence flags the deployment ships (compose and Kubernetes must agree; asserted)."""
    compose, k8s = compose_redis_flags(), k8s_redis_flags()
    assert compose == k8s, f"docker-compose.yml runs Redis with {compose}, the k8s StatefulSet with {k8s}"
    return compose
