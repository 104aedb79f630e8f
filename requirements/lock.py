"""Write the lock, ``requirements/constraints.txt``, from the packages of the running environment.

``make lock`` runs it after a package was added (``pip install -c requirements/constraints.txt
NAME``): every installed distribution is pinned exactly, except the project itself and the
packages the platform must not pull in (``tritonclient[all]``'s cuda-python family and the empty
``perf-analyzer`` placeholder). Local version labels are dropped (``torch==2.13.0``, not
``+cpu``), so the same lock serves the CPU and the CUDA torch builds of the images.
"""

from __future__ import annotations

import subprocess
import sys

HEADER = """\
# The lock: exact versions of every package of the platform's environment (`make lock` writes it
# from the shared venv with requirements/lock.py; edit by adding a package, then re-locking).
# Used as a constraints file (-c) by the Makefile, docker/Dockerfile, docker/triton.Dockerfile;
# registry.requirements reads the logged models' requirement lines from it and tests check that
# prefect.yaml's prefect-version agrees. Why some ranges exist at all: requirements/*.txt.
"""
EXCLUDED = {"fer-platform", "cuda-bindings", "cuda-core", "cuda-pathfinder", "cuda-python", "perf-analyzer"}


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def lock_lines(freeze: str) -> list[str]:
    lines = []
    for line in freeze.splitlines():
        if not line or line.startswith(("#", "-e ")) or "==" not in line:
            continue
        name, version = line.split("==", 1)
        if canonical(name) in EXCLUDED:
            continue
        lines.append(f"{name}=={version.split('+', 1)[0]}")
    return sorted(lines, key=lambda line: canonical(line.split("==")[0]))


def main() -> int:
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout
    sys.stdout.write(HEADER + "\n".join(lock_lines(freeze)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
