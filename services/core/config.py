"""Validated service settings (pydantic-settings), merged from a file, secret files, the environment and flags.

Each service declares one settings model, a subclass of ``ServiceConfig`` with
its own ``env_prefix``; ``main()`` builds it once with ``load_config`` and
passes it down. Sources, in increasing precedence:

    defaults < JSON file (``--config``) < secret files (``--secrets-dir``)
             < environment (``MOEMESH_GATEWAY_PORT``) < flags (``--port``)

A secret file holds one setting and is named like its environment variable
(``MOEMESH_SCHEDULER_CLUSTER_TOKEN``), as Kubernetes mounts a Secret's keys.
Values from the environment and files are typed by their field: a string
field takes the text as it is (``MOEMESH_SCHEDULER_CLUSTER_TOKEN=12345678``
is a token, ``null`` is the word "null"); lists and mappings are JSON. Every
field is a flag too (``--max-num-seqs``; booleans ``--x`` / ``--no-x``), its
help the field's description. Invalid values raise ``ValueError`` naming the
field.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import typing
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

import pydantic
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    EnvSettingsSource,
    JsonConfigSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars


def _off_is_none(value: Any) -> Any:
    """"off" (or an empty value) turns an optional port off: `moemesh up` sets metrics ports unless told so."""
    return None if isinstance(value, str) and value.strip().lower() in ("", "off", "none") else value


# A service's Prometheus port setting: `metrics_port: MetricsPort = None`.
MetricsPort = Annotated[Annotated[int, pydantic.Field(ge=0, le=65535)] | None, pydantic.BeforeValidator(_off_is_none),
                        pydantic.Field(description="Prometheus /metrics port (0: a free one); unset or 'off': off "
                                                   "(`moemesh up` sets 0)")]


class ServiceConfig(BaseSettings):
    """Base of every service's settings: frozen, unknown keys rejected, one environment prefix per service."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True, env_prefix="MOEMESH_")

    tls_dir: pathlib.Path | None = pydantic.Field(
        default=None,
        description="mutual TLS between the services: a directory made by `moemesh certs` (ca.crt, <role>.crt/.key); "
                    "unset: plaintext")


C = TypeVar("C", bound=ServiceConfig)


def load_config(
    cls: type[C],
    *,
    file: str | pathlib.Path | None = None,
    secrets_dir: str | pathlib.Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> C:
    """Build ``cls`` from the merged sources; flags whose value is None are ignored.

    A secret (a `SecretStr` field, such as `cluster_token`) given as a flag is refused: every process on the
    machine can read a command line (`ps`), so secrets come from the environment, a secret file or the config file.
    """
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    on_the_command_line = sorted(name for name in given if _is_secret(cls.model_fields.get(name)))
    if on_the_command_line:
        name = on_the_command_line[0]
        raise ValueError(f"{name}: a secret is not taken from the command line (ps shows it to every user); give it "
                         f"by environment ({cls.model_config.get('env_prefix', '')}{name.upper()}) or a secret file")
    values: dict[str, Any] = {}
    for layer in (_file_values(cls, file), _secret_values(cls, secrets_dir), _EnvValues(cls, env or {})(), given):
        values.update(layer)
    try:
        return cls.model_validate(values)
    except pydantic.ValidationError as exc:
        raise ValueError(describe_validation_error(exc)) from None


def add_flags(parser: argparse.ArgumentParser, cls: type[ServiceConfig]) -> CliSettingsSource:
    """Every field of ``cls`` as a flag of ``parser``; the returned source reads them back (`flag_values`)."""
    return CliSettingsSource(cls, root_parser=parser, cli_kebab_case=True, cli_implicit_flags=True,
                             cli_enforce_required=False, cli_prog_name=parser.prog)


def flag_values(source: CliSettingsSource, args: argparse.Namespace) -> dict[str, Any]:
    """The fields the command line set (absent ones are left to the other sources)."""
    return source(parsed_args=args)()


def describe_validation_error(exc: pydantic.ValidationError) -> str:
    """One line per invalid field: ``field: reason (got value)``."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<config>"
        lines.append(f"{field}: {err['msg']} (got {err.get('input')!r})")
    return "invalid configuration: " + "; ".join(lines)


class _EnvValues(EnvSettingsSource):
    """The library's environment source, reading a given mapping instead of this process's environment."""

    def __init__(self, cls: type[ServiceConfig], env: Mapping[str, str]) -> None:
        self._mapping = env
        super().__init__(cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._mapping, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


def _file_values(cls: type[ServiceConfig], file: str | pathlib.Path | None) -> dict[str, Any]:
    if not file:
        return {}
    path = pathlib.Path(file)
    if not path.is_file():
        raise ValueError(f"config file {path}: no such file")
    try:
        values = JsonConfigSettingsSource(cls, json_file=path)()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"config file {path}: {exc}") from None
    except TypeError as exc:  # a JSON document that is not an object
        raise ValueError(f"config file {path}: expected a JSON object ({exc})") from None
    return values


def _secret_values(cls: type[ServiceConfig], secrets_dir: str | pathlib.Path | None) -> dict[str, Any]:
    if not secrets_dir:
        return {}
    if not pathlib.Path(secrets_dir).is_dir():
        raise ValueError(f"secrets directory {secrets_dir}: no such directory")
    return SecretsSettingsSource(cls, secrets_dir=secrets_dir)()


def _is_secret(field: pydantic.fields.FieldInfo | None) -> bool:
    """Whether a settings field holds a secret (`SecretStr`, optional or not)."""
    if field is None:
        return False
    return field.annotation is pydantic.SecretStr or pydantic.SecretStr in typing.get_args(field.annotation)
