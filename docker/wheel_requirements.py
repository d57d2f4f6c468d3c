"""Print a wheel's runtime requirements, one a line, less the distributions named to leave out.

The GPU image installs nemotron-serve with `--no-deps` on top of the TensorRT-LLM release image
(whose torch, built for its CUDA, must stay), and installs the other requirements from this
list. Requirements that only an extra asks for (`; extra == "test"`) are not runtime ones.
Standard library only: it runs in the image's build stage before anything is installed.

    python wheel_requirements.py dist/nemotron_serve-0.1.0-py3-none-any.whl --without torch
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from collections.abc import Iterable, Sequence
from email.parser import HeaderParser
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    """A distribution name in PEP 503 normal form (`Foo_Bar` -> `foo-bar`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_requirements(wheel: Path) -> list[str]:
    """The `Requires-Dist` entries of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
        if metadata is None:
            raise ValueError(f"{wheel.name} has no .dist-info/METADATA")
        headers = HeaderParser().parsestr(archive.read(metadata).decode("utf-8"))
    return headers.get_all("Requires-Dist") or []


def runtime_requirements(requirements: Iterable[str], without: Iterable[str]) -> list[str]:
    """The requirements no extra is needed for, minus the distributions in `without`."""
    skipped = {normalize(name) for name in without}
    kept = []
    for requirement in requirements:
        marker = requirement.partition(";")[2]
        match = _NAME.match(requirement)
        if match is None or re.search(r"\bextra\s*==", marker):
            continue
        if normalize(match.group(1)) not in skipped:
            kept.append(requirement.strip())
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    """Print the runtime requirements of the wheel given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--without", action="append", default=[], metavar="NAME")
    args = parser.parse_args(argv)
    for line in runtime_requirements(wheel_requirements(args.wheel), args.without):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
