"""Validated service configuration, merged from a file, the environment and flags.

Each service declares one pydantic model (a subclass of ``ServiceConfig``);
``main()`` builds it once with ``load_config`` and passes it down. Sources
are merged in order of increasing precedence: defaults < JSON file <
environment (``<ENV_PREFIX><FIELD>``, e.g. ``MOEMESH_GATEWAY_PORT``) < command-line flags. Invalid values raise
``ValueError`` naming the field.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import pydantic


class ServiceConfig(pydantic.BaseModel):
    """Base of every service's configuration: frozen, unknown keys rejected."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    # Environment variables named <ENV_PREFIX><FIELD NAME IN CAPITALS> set fields.
    ENV_PREFIX: ClassVar[str] = "MOEMESH_"

    # Mutual TLS between the services: a directory made by `moemesh certs` (ca.crt, <role>.crt/.key); None = plaintext.
    tls_dir: pathlib.Path | None = None


C = TypeVar("C", bound=ServiceConfig)


def load_config(
    cls: type[C],
    *,
    file: str | pathlib.Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> C:
    """Build ``cls`` from the merged sources; flags whose value is None are ignored."""
    values: dict[str, Any] = {}
    if file:
        values.update(_read_file(pathlib.Path(file)))
    values.update(_from_env(cls, env or {}))
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    try:
        return cls.model_validate(values)
    except pydantic.ValidationError as exc:
        raise ValueError(describe_validation_error(exc)) from None


def describe_validation_error(exc: pydantic.ValidationError) -> str:
    """One line per invalid field: ``field: reason (got value)``."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<config>"
        lines.append(f"{field}: {err['msg']} (got {err.get('input')!r})")
    return "invalid configuration: " + "; ".join(lines)


def _read_file(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a JSON object")
    return data


def _from_env(cls: type[ServiceConfig], env: Mapping[str, str]) -> dict[str, Any]:
    """Fields set as <ENV_PREFIX><FIELD>; values are parsed as JSON when they can be."""
    found: dict[str, Any] = {}
    for name in cls.model_fields:
        raw = env.get(cls.ENV_PREFIX + name.upper())
        if raw is None:
            continue
        try:
            found[name] = json.loads(raw)
        except json.JSONDecodeError:
            found[name] = raw
    return found
