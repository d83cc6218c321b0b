"""Print, as pip constraints, the installed versions of what `pip install -e ".[test]"` installs.

CI installs with these pins (`.ci/constraints.txt`), so a package released between a session's
last run and CI's cannot break the landing (transformers 5.25 once did: it began to import the
`kernels` package). Refresh them after installing the newest releases and running the tests:
`pip install -U -e ".[test]" && python -m pytest -n 2 --dist loadfile && python .ci/pin_versions.py > .ci/constraints.txt`.
"""
from __future__ import annotations

from importlib import metadata
from typing import Dict, List, Tuple

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# torch comes from its own pinned line (a CPU build on the local disk); pip and the build tools
# belong to the machine, not to the package
NOT_PINNED = {"fastdrag", "torch", "pip", "setuptools", "wheel"}


def installed_closure(root: str, extras: Tuple[str, ...]) -> Dict[str, str]:
    """{name: installed version} of every distribution that `root[extras]` requires, transitively."""
    versions: Dict[str, str] = {}
    todo: List[Tuple[str, Tuple[str, ...]]] = [(root, extras)]
    seen = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        for text in metadata.distribution(name).requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not any(
                    requirement.marker.evaluate({"extra": extra}) for extra in wanted or ("",)):
                continue
            dependency = canonicalize_name(requirement.name)
            try:
                versions[dependency] = metadata.version(dependency)
            except metadata.PackageNotFoundError:
                continue  # not needed on this platform
            todo.append((dependency, tuple(sorted(requirement.extras))))
    return versions


if __name__ == "__main__":
    pins = installed_closure("fastdrag", ("test",))
    print("# written by .ci/pin_versions.py: the versions CI installs (see that file)")
    print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items()) if name not in NOT_PINNED))
