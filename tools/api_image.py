"""Rebuild proto/images/nemotron-v1.binpb, the baseline that `buf breaking` holds the API to.

Run it only to release a new compatible baseline of `nemotron.v1` (say, once added fields
have shipped and clients may rely on them), never to silence a breaking change: it refuses to
overwrite an image that the current proto/ breaks, and prints buf's report instead.

    .venv/bin/python tools/api_image.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "proto"
API_IMAGE = PROTO_DIR / "images" / "nemotron-v1.binpb"
FINDINGS_EXIT_CODE = 100  # buf's exit status when lint or breaking found something


class BreakingChangeError(RuntimeError):
    """proto/ breaks the committed image; the message is buf's report."""


def buf_path() -> Path:
    """The buf binary of the buf-bin test extra, installed next to this interpreter."""
    return Path(sys.executable).parent / "buf"


def run_buf(
    args: Sequence[str], environ: Mapping[str, str] = os.environ
) -> subprocess.CompletedProcess:
    """buf ARGS from the repository root, so that relative paths and reports read from there."""
    return subprocess.run(
        [str(buf_path()), *args],
        capture_output=True, text=True, cwd=REPO_ROOT, env=dict(environ), timeout=120,
    )  # fmt: skip


def rebuild_image(
    proto_dir: Path = PROTO_DIR, image: Path = API_IMAGE, environ: Mapping[str, str] = os.environ
) -> None:
    """Build `image` from `proto_dir`, unless `proto_dir` breaks the image already there."""
    if image.is_file():
        check = run_buf(["breaking", str(proto_dir), "--against", str(image)], environ)
        if check.returncode == FINDINGS_EXIT_CODE:
            raise BreakingChangeError(check.stdout.strip())
        if check.returncode != 0:
            raise RuntimeError(f"buf breaking failed: {check.stderr.strip()}")
    image.parent.mkdir(parents=True, exist_ok=True)
    build = run_buf(["build", str(proto_dir), "-o", str(image)], environ)
    if build.returncode != 0:
        raise RuntimeError(f"buf build failed: {build.stderr.strip()}")


def main() -> int:
    """Rebuild the committed image; returns the exit code."""
    image = API_IMAGE.relative_to(REPO_ROOT)
    try:
        rebuild_image()
    except BreakingChangeError as error:
        print(
            f"api_image: refused: proto/ breaks {image}. Undo the breaking change; one that is "
            f"needed belongs in a new package (nemotron.v2), not in a new baseline.\n{error}",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as error:
        print(f"api_image: error: {error}", file=sys.stderr)
        return 1
    print(image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
