"""The contract: committed stubs match the protos, packaging lists every package."""

from __future__ import annotations

import pathlib
import tomllib

from moemesh.protos import generate

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_committed_stubs_match_the_protos():
    stale = generate.stale_files()
    assert not stale, f"stubs are stale, run `python protos/generate.py`: {stale}"


def test_every_proto_field_and_rpc_is_documented():
    undocumented = []
    for proto in (REPO / "protos" / "moemesh" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            if stripped.startswith("rpc ") and not lines[i - 1].strip().startswith("//"):
                undocumented.append(f"{proto.name}:{i + 1}: {stripped}")
    assert not undocumented, "RPCs without a comment:\n" + "\n".join(undocumented)


def test_pyproject_lists_every_package_folder():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    missing = []
    for package, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            name = ".".join([package, *relative.parts])
            if name not in listed:
                missing.append(name)
    assert not missing, f"packages missing from pyproject.toml: {sorted(missing)}"
