"""Generate the Python protobuf and gRPC modules of proto/ (run by setup.py on every build).

The output goes to generated/ as the top-level package `nemotron` (`nemotron.v1.*_pb2`), which
is not committed: the build produces it from the .proto files, reproducibly.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) over every .proto file; return the files written."""
    from importlib import resources

    from grpc_tools import protoc  # a build requirement

    protos = sorted(PROTO_DIR.rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[p.name for p in protos]}")
    for package in {p.parent.relative_to(PROTO_DIR) for p in protos}:
        for directory in [out_dir / package, *(out_dir / package).parents]:
            if directory == out_dir or out_dir not in directory.parents:
                continue
            (directory / "__init__.py").touch()
    return sorted(out_dir.rglob("*.py*"))


if __name__ == "__main__":
    for path in generate(ROOT / "generated"):
        print(path.relative_to(ROOT))
