"""Generate the Python protobuf and gRPC modules (run by setup.py on every build).

The output goes to generated/, which is not committed: the build produces it from the .proto
files, reproducibly.
- proto/ (our API) -> the top-level package `nemotron` (`nemotron.v1.*_pb2`);
- third_party/triton/ (Triton's KServe v2 protocol files, unmodified) -> the package
  `triton_proto`. Their files keep the names Triton gives them (`grpc_service.proto`,
  `model_config.proto`, no directory), so the descriptors equal the ones `tritonclient` registers
  and both load in one process; protoc writes such files as top-level modules importing each
  other by bare name, so those imports are pointed into the package (as tritonclient does).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
TRITON_DIR = ROOT / "third_party" / "triton"
TRITON_PACKAGE = "triton_proto"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) over every .proto file; return the files written."""
    protos = sorted(PROTO_DIR.rglob("*.proto"))
    _protoc(PROTO_DIR, protos, out_dir)
    for package in {p.parent.relative_to(PROTO_DIR) for p in protos}:
        for directory in [out_dir / package, *(out_dir / package).parents]:
            if directory == out_dir or out_dir not in directory.parents:
                continue
            (directory / "__init__.py").touch()
    triton = sorted(TRITON_DIR.glob("*.proto"))
    package_dir = out_dir / TRITON_PACKAGE
    _protoc(TRITON_DIR, triton, package_dir)
    modules = [p.stem + "_pb2" for p in triton]
    for path in package_dir.glob("*_pb2*.py*"):
        text = path.read_text()
        for module in modules:
            pattern = rf"^import {module} as "
            text = re.sub(pattern, f"from {TRITON_PACKAGE} import {module} as ", text, flags=re.M)
        path.write_text(text)
    (package_dir / "__init__.py").touch()
    return sorted(out_dir.rglob("*.py*"))


def _protoc(include: Path, protos: list[Path], out_dir: Path) -> None:
    from importlib import resources

    from grpc_tools import protoc  # a build requirement

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "protoc",
        f"-I{include}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[p.name for p in protos]}")


if __name__ == "__main__":
    for path in generate(ROOT / "generated"):
        print(path.relative_to(ROOT))
