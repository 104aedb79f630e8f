"""Development-time tool: (re)vendor the Data Docs assets listed in ``manifest.json`` from npm.

    python data_checks/vendor/refresh.py            # the pinned versions, again
    python data_checks/vendor/refresh.py --resolve  # newest version in each ``cdn_range`` (vega@5 ...)

For each package it runs ``npm pack <name>@<version>`` (the npm registry, nothing else), copies
the listed files and the package's licence file to ``<name>@<version>/``, and records in the
manifest the tarball URL, its integrity, the licence and each file's sha256 and size. Folders
of packages no longer listed are removed. The platform never runs this; it only reads the result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"
LICENCE_NAMES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "COPYING")


def _npm(*args: str, cwd: Path) -> str:
    return subprocess.run(["npm", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def unpack_npm_tarball(tarball: Path, dest: Path) -> None:
    """Extract an npm tarball under ``dest`` with the stdlib's ``data`` filter: members that leave
    ``dest`` (``../``, absolute paths, links out), devices and setuid bits are refused
    (``tarfile.FilterError``); tests/test_security.py holds it to that."""
    with tarfile.open(tarball) as tar:
        tar.extractall(dest, filter="data")


def _vendor(package: dict, scratch: Path, resolve: bool) -> str:
    """Fetch one package into ``<name>@<version>/``; returns that folder's name."""
    spec = f"{package['name']}@{package['cdn_range'] if resolve and 'cdn_range' in package else package['version']}"
    packed = json.loads(_npm("pack", spec, "--json", cwd=scratch))[0]
    package["version"] = packed["version"]
    package["integrity"] = packed["integrity"]
    package["tarball"] = _npm("view", f"{package['name']}@{packed['version']}", "dist.tarball", cwd=scratch).strip()
    unpacked = scratch / packed["filename"].removesuffix(".tgz")
    unpack_npm_tarball(scratch / packed["filename"], unpacked)
    root = unpacked / "package"
    meta = json.loads((root / "package.json").read_text())
    package["license"] = meta.get("license")
    folder = f"{package['name']}@{package['version']}"
    target = HERE / folder
    if target.exists():
        shutil.rmtree(target)
    licence = next((n for n in LICENCE_NAMES if (root / n).is_file()), None)
    package["license_file"] = licence  # None: the npm package ships none (licence in package.json and file banners)
    for relative in [*package["files"], *([licence] if licence else [])]:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / relative, target / relative)
    for relative, record in package["files"].items():
        data = (target / relative).read_bytes()
        record["sha256"] = hashlib.sha256(data).hexdigest()
        record["bytes"] = len(data)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolve", action="store_true", help="newest version in each package's cdn_range")
    args = parser.parse_args()
    manifest = json.loads(MANIFEST.read_text())
    with tempfile.TemporaryDirectory(prefix="fer-vendor-") as scratch:
        kept = {_vendor(p, Path(scratch), args.resolve) for p in manifest["packages"]}
    for child in HERE.iterdir():
        if child.is_dir() and child.name != "__pycache__":
            # scoped packages live one level down (@scope/name@version)
            names = {c.relative_to(HERE).as_posix() for c in (child.iterdir() if child.name.startswith("@") else [child])}
            for name in names - kept:
                shutil.rmtree(HERE / name)
            if child.name.startswith("@") and not any(child.iterdir()):
                child.rmdir()
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
