#!/usr/bin/env python3
"""Which packages scripts/bench/gpu_prepare.sh carries to a GPU machine lent in this workplace, one `name==version`
a line: ROOTS and everything they require, transitively, as installed in the environment that runs this (the
checkout's .venv: the versions the tests ran with), less EXCLUDED and everything those require (PyTorch's own
closure, which the machine's image holds, built together) unless named in ROOTS.

    python scripts/bench/gpu_wheels.py 3.12 "transformers deepspeed hydra-core omegaconf" "torch numpy"

Requirements are read from the installed packages' metadata, their environment markers evaluated for CPython
PYVER on x86-64 Linux with no extras; a requirement that is not installed here is left out (nothing here imports
it). Exits 2 naming a root that is not installed.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def marker_environment(python_version: str) -> dict[str, str]:
    """The environment markers of CPython `python_version` (e.g. "3.12") on x86-64 Linux, no extra."""
    return {**default_environment(), "python_version": python_version, "python_full_version": f"{python_version}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "sys_platform": "linux",
            "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64", "extra": ""}


def closure(names: list[str], environment: dict[str, str]) -> dict[str, str]:
    """{canonical name: installed version} of `names` and what they require, transitively, where installed."""
    found: dict[str, str] = {}
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        found[name] = dist.version
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                todo.append(canonicalize_name(requirement.name))
    return found


def carried(python_version: str, roots: list[str], excluded: list[str]) -> dict[str, str]:
    """The packages to carry: the closure of `roots` less the closure of `excluded`, the roots themselves kept (a
    root that PyTorch also requires is carried at this environment's version: typing-extensions, for pydantic)."""
    environment = marker_environment(python_version)
    kept, left = closure(roots, environment), closure(excluded, environment)
    named = {canonicalize_name(r) for r in roots}
    return {name: version for name, version in sorted(kept.items()) if name in named or name not in left}


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit(__doc__)
    python_version, roots, excluded = argv[0], argv[1].split(), argv[2].split()
    packages = carried(python_version, roots, excluded)  # every installed root is carried
    missing = [r for r in roots if canonicalize_name(r) not in packages]
    if missing:
        print(f"scripts/bench/gpu_wheels.py: not installed here: {', '.join(missing)}; run it with the checkout's "
              ".venv/bin/python (make install)", file=sys.stderr)
        raise SystemExit(2)
    for name, version in packages.items():
        print(f"{name}=={version}")


if __name__ == "__main__":
    main(sys.argv[1:])
