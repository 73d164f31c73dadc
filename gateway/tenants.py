"""Tenants: who a caller is (API key or JWT), which models it may use, its priority and its rate limits.

The tenants file (GatewayConfig.tenants_file, JSON) holds no plain keys, only salted SHA-256 hashes written by
`moemesh hash-key`:

    {
      "salt": "optional per-file salt, used by entries written as a bare hex digest",
      "jwt": {"issuer": "https://auth.example.com", "audience": "moemesh", "algorithms": ["HS256"],
              "key": "<HS256 secret>", "public_key": "<RS256 PEM>", "tenant_claim": "tenant"},
      "tenants": [
        {"id": "acme", "api_key_hashes": ["sha256$<salt>$<hex digest>"], "allowed_models": ["demo-moe"],
         "priority": 5, "max_priority": 7, "requests_per_second": 10, "burst": 20, "tokens_per_minute": 60000,
         "max_concurrent_requests": 64, "cache_scope": "acme-group"}
      ]
    }

Tenants never share cache entries (answers, embeddings, prefix KV blocks) unless they name the same
`cache_scope` (or the gateway runs with `cache_shared_scope`: one scope for all).

Without a tenants file the gateway runs in open mode: every caller is the "default" tenant, with every model,
the priority it asks for and no rate limits (as before tenants existed).

A presented key is hashed once per distinct salt in the file (usually one), looked up in a dict by its digest
and confirmed with `hmac.compare_digest`; the time taken does not depend on which keys exist. Every failure to
authenticate (no credential, unknown key, bad or expired token) gives the same message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pathlib
import secrets
from collections.abc import Iterable
from typing import Literal

import jwt as pyjwt
import pydantic

from moemesh.services.core.errors import PermissionDenied, Unauthenticated

DEFAULT_TENANT = "default"
AUTH_FAILED = "invalid or missing credentials"
HASH_SCHEME = "sha256"
MAX_PRIORITY = 9


def hash_key(key: str, salt: str) -> str:
    """The hex SHA-256 digest of `salt` + `key` (what the tenants file stores, never the key)."""
    return hashlib.sha256((salt + key).encode()).hexdigest()


def hash_line(key: str, salt: str | None = None) -> str:
    """A self-contained `api_key_hashes` entry, `sha256$<salt>$<digest>`, with a fresh salt unless given."""
    salt = salt if salt is not None else secrets.token_hex(16)
    if "$" in salt:
        raise ValueError("the salt may not contain '$'")
    return f"{HASH_SCHEME}${salt}${hash_key(key, salt)}"


def new_key() -> str:
    """A random API key for an operator to hand out."""
    return "mm-" + secrets.token_urlsafe(32)


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class JwtSettings(_Strict):
    """How bearer JWTs are verified and which claim names the tenant."""

    issuer: str | None = None
    audience: str | None = None
    algorithms: list[Literal["HS256", "RS256"]] = pydantic.Field(default=["HS256"], min_length=1)
    key: str | None = None  # HS256 shared secret
    public_key: str | None = None  # RS256 public key, PEM
    tenant_claim: str = "tenant"
    leeway: float = pydantic.Field(default=0.0, ge=0)

    @pydantic.model_validator(mode="after")
    def _keys_present(self) -> JwtSettings:
        if "HS256" in self.algorithms and not self.key:
            raise ValueError("HS256 needs `key` (the shared secret)")
        if "RS256" in self.algorithms and not self.public_key:
            raise ValueError("RS256 needs `public_key` (PEM)")
        return self


class Tenant(_Strict):
    id: str = pydantic.Field(min_length=1, max_length=128)
    api_key_hashes: list[str] = []
    allowed_models: list[str] = []  # empty: every model
    priority: int = pydantic.Field(default=0, ge=0, le=MAX_PRIORITY)  # used when a request asks for none
    max_priority: int | None = pydantic.Field(default=None, ge=0, le=MAX_PRIORITY)  # None: `priority`
    requests_per_second: float | None = pydantic.Field(default=None, gt=0)  # None: unlimited
    burst: float | None = pydantic.Field(default=None, ge=1)  # requests bucket size; None: max(1, rps)
    tokens_per_minute: int | None = pydantic.Field(default=None, gt=0)  # None: unlimited
    # Requests in progress at once on one gateway (gateway/in_flight.py); None: unlimited.
    max_concurrent_requests: int | None = pydantic.Field(default=None, ge=1)
    # Tenants naming the same cache_scope share cached answers, embeddings and prefix KV; None: its own scope.
    cache_scope: str | None = pydantic.Field(default=None, min_length=1, max_length=128)

    def allows(self, model_id: str) -> bool:
        return not self.allowed_models or model_id in self.allowed_models

    def check_model(self, model_id: str) -> None:
        if not self.allows(model_id):
            raise PermissionDenied(f"model {model_id!r} is not allowed for this API key")

    def effective_priority(self, requested: int) -> int:
        """The request's priority (the tenant's when it asks for 0), capped by the tenant's maximum."""
        cap = self.max_priority if self.max_priority is not None else self.priority
        return max(0, min(requested or self.priority, cap))


OPEN_TENANT = Tenant(id=DEFAULT_TENANT, max_priority=MAX_PRIORITY)


def cache_scope(tenant: Tenant, shared: bool = False) -> str:
    """The scope of a tenant's cache entries (answers, embeddings, prefix KV): "shared" when the operator shares
    one scope for all (`cache_shared_scope`), else the tenant's configured `cache_scope`, else its own. The
    prefixes keep a configured scope from ever equalling a tenant's own."""
    if shared:
        return "shared"
    return f"scope:{tenant.cache_scope}" if tenant.cache_scope is not None else f"tenant:{tenant.id}"


class TenantsFile(_Strict):
    salt: str | None = None
    jwt: JwtSettings | None = None
    tenants: list[Tenant] = pydantic.Field(min_length=1)

    @pydantic.model_validator(mode="after")
    def _unique(self) -> TenantsFile:
        ids = [t.id for t in self.tenants]
        if len(set(ids)) != len(ids):
            raise ValueError("tenant ids must be unique")
        return self


class TenantRegistry:
    """Tenants by id and by key hash; `authenticate` turns a presented credential into a tenant."""

    def __init__(self, spec: TenantsFile) -> None:
        self.spec = spec
        self.by_id = {t.id: t for t in spec.tenants}
        self.jwt = spec.jwt
        # salt -> {digest: (stored digest, tenant)}
        self._by_salt: dict[str, dict[str, tuple[str, Tenant]]] = {}
        for tenant in spec.tenants:
            for entry in tenant.api_key_hashes:
                salt, digest = self._parse(entry, spec.salt, tenant.id)
                table = self._by_salt.setdefault(salt, {})
                if digest in table:
                    raise ValueError(f"tenants file: the same key hash appears twice (tenant {tenant.id!r})")
                table[digest] = (digest, tenant)

    @staticmethod
    def _parse(entry: str, file_salt: str | None, tenant_id: str) -> tuple[str, str]:
        parts = entry.split("$")
        if len(parts) == 3 and parts[0] == HASH_SCHEME:
            salt, digest = parts[1], parts[2]
        elif len(parts) == 1 and file_salt is not None:
            salt, digest = file_salt, parts[0]
        else:
            raise ValueError(f"tenants file: tenant {tenant_id!r}: api_key_hashes entries must be "
                             "'sha256$<salt>$<hex>' (from `moemesh hash-key`), or bare hex with a file `salt`")
        digest = digest.lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"tenants file: tenant {tenant_id!r}: not a SHA-256 hex digest (a plain key?)")
        return salt, digest

    @classmethod
    def load(cls, path: str | pathlib.Path) -> TenantRegistry:
        try:
            data = json.loads(pathlib.Path(path).read_text())
            return cls(TenantsFile.model_validate(data))
        except (OSError, json.JSONDecodeError, pydantic.ValidationError) as exc:
            raise ValueError(f"tenants file {path}: {exc}") from None

    def authenticate(self, credential: str | None) -> Tenant:
        """The tenant of an API key or JWT; Unauthenticated (one message for every failure) otherwise."""
        if not credential:
            raise Unauthenticated(AUTH_FAILED, "no credential")
        tenant = self._by_key(credential)
        if tenant is None and self.jwt is not None and credential.count(".") == 2:
            return self._by_jwt(credential)
        if tenant is None:
            raise Unauthenticated(AUTH_FAILED, "unknown API key")
        return tenant

    def _by_key(self, key: str) -> Tenant | None:
        found = None
        for salt, table in self._by_salt.items():  # every salt is tried, found or not
            digest = hash_key(key, salt)
            stored, tenant = table.get(digest, ("0" * 64, None))
            if hmac.compare_digest(digest, stored) and tenant is not None:
                found = tenant
        return found

    def _by_jwt(self, token: str) -> Tenant:
        """The tenant a valid JWT names; Unauthenticated (with the reason, for the audit log) otherwise."""
        settings = self.jwt
        try:
            algorithm = pyjwt.get_unverified_header(token).get("alg")
            if algorithm not in settings.algorithms:
                raise Unauthenticated(AUTH_FAILED, f"JWT algorithm {algorithm!r} is not allowed")
            key = settings.key if algorithm == "HS256" else settings.public_key
            claims = pyjwt.decode(
                token, key, algorithms=[algorithm], audience=settings.audience, issuer=settings.issuer,
                leeway=settings.leeway,
                options={"require": ["exp"] + (["aud"] if settings.audience else []) + (["iss"] if settings.issuer else []),
                         "verify_aud": settings.audience is not None},
            )
        except pyjwt.PyJWTError as exc:
            raise Unauthenticated(AUTH_FAILED, f"invalid JWT ({type(exc).__name__})") from None
        tenant_id = claims.get(settings.tenant_claim)
        tenant = self.by_id.get(tenant_id) if isinstance(tenant_id, str) else None
        if tenant is None:
            raise Unauthenticated(AUTH_FAILED, f"JWT claim {settings.tenant_claim!r} names no known tenant")
        return tenant

    def tenants(self) -> Iterable[Tenant]:
        return self.by_id.values()


class Authenticator:
    """The gateway's front-door check; open mode (no registry) makes every caller the default tenant."""

    def __init__(self, registry: TenantRegistry | None = None) -> None:
        self.registry = registry

    @property
    def open(self) -> bool:
        return self.registry is None

    def authenticate(self, credential: str | None) -> Tenant:
        if self.registry is None:
            return OPEN_TENANT
        return self.registry.authenticate(credential)


def credential_from_headers(authorization: str | None, api_key: str | None) -> str | None:
    """The key or token from `authorization: Bearer <credential>` or else `x-api-key: <credential>`."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return api_key.strip() if api_key and api_key.strip() else None


def credential_from_metadata(metadata) -> str | None:
    """The credential in gRPC invocation metadata (`authorization` or `x-api-key`)."""
    values = {}
    for item in metadata or ():
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        if isinstance(value, bytes):
            continue
        values.setdefault(key.lower(), value)
    return credential_from_headers(values.get("authorization"), values.get("x-api-key"))
