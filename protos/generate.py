"""Regenerate the Python stubs of the moemesh contract.

Run ``python -m protos.generate`` (or ``python protos/generate.py``) from the
repository root. The stubs land in ``moemesh/v1/`` and are committed; a test
fails when they are stale.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PROTO_PACKAGE = pathlib.Path("moemesh/v1")


def proto_files() -> list[pathlib.Path]:
    """The contract's .proto files, relative to the proto root."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))


def includes() -> list[str]:
    """protoc -I flags: the contract, protobuf's well-known types, and google/api (HTTP annotations)."""
    import google.api.annotations_pb2  # from googleapis-common-protos, which ships the .proto files too

    googleapis = pathlib.Path(google.api.annotations_pb2.__file__).parents[2]
    return [f"-I{PROTO_ROOT}", f"-I{pathlib.Path(protoc.__file__).parent / '_proto'}", f"-I{googleapis}"]


def descriptor_set(out_file: pathlib.Path) -> pathlib.Path:
    """A FileDescriptorSet of the contract and its imports (what Envoy's gRPC-JSON transcoder reads)."""
    args = ["grpc_tools.protoc", *includes(), "--include_imports", f"--descriptor_set_out={out_file}",
            *[str(p) for p in proto_files()]]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: see the messages above")
    return out_file


def generate(out_dir: pathlib.Path) -> None:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto under out_dir."""
    args = [
        "grpc_tools.protoc",
        *includes(),
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: see the messages above")
    init = out_dir / PROTO_PACKAGE / "__init__.py"
    init.write_text('"""Generated stubs of the moemesh v1 contract (protos/moemesh/v1). Do not edit."""\n')


def generated_texts(out_dir: pathlib.Path) -> dict[str, str]:
    """Map of relative path -> text of every generated file under out_dir."""
    root = out_dir / PROTO_PACKAGE
    return {str(p.relative_to(out_dir)): p.read_text() for p in sorted(root.glob("*.py*"))}


def stale_files() -> list[str]:
    """Files whose committed text differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generated_texts(_generate_into(pathlib.Path(tmp)))
    committed = generated_texts(REPO_ROOT)
    names = set(fresh) | set(committed)
    return sorted(n for n in names if fresh.get(n) != committed.get(n))


def _generate_into(out_dir: pathlib.Path) -> pathlib.Path:
    generate(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        return 1 if stale else 0
    for old in (REPO_ROOT / PROTO_PACKAGE).glob("*_pb2*.py*"):
        old.unlink()
    generate(REPO_ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
