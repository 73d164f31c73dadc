"""Tenants file, API key hashing, JWT verification, allow-lists and priority (no mesh)."""

from __future__ import annotations

import json
import time

import jwt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from moemesh.cli import main as cli
from moemesh.gateway.tenants import (
    AUTH_FAILED,
    OPEN_TENANT,
    Authenticator,
    TenantRegistry,
    TenantsFile,
    credential_from_headers,
    credential_from_metadata,
    hash_key,
    hash_line,
)
from moemesh.services.core.errors import PermissionDenied, Unauthenticated

SECRET = "jwt-test-secret-that-is-long-enough-for-hs256"


def registry(**extra) -> TenantRegistry:
    spec = {
        "salt": "filesalt",
        "tenants": [
            {"id": "acme", "api_key_hashes": [hash_line("acme-key")], "allowed_models": ["demo-moe"],
             "priority": 3, "max_priority": 6},
            {"id": "globex", "api_key_hashes": [hash_key("globex-key", "filesalt")]},  # bare hex, file salt
        ],
        **extra,
    }
    return TenantRegistry(TenantsFile.model_validate(spec))


def token(claims: dict, key: str = SECRET, algorithm: str = "HS256") -> str:
    base = {"tenant": "acme", "iss": "https://auth.test", "aud": "moemesh", "exp": int(time.time()) + 60}
    return jwt.encode({**base, **claims}, key, algorithm=algorithm)


JWT_HS = {"jwt": {"issuer": "https://auth.test", "audience": "moemesh", "algorithms": ["HS256"], "key": SECRET}}


def test_hash_lines_never_contain_the_key_and_salts_differ():
    a, b = hash_line("super-secret-key"), hash_line("super-secret-key")
    assert "super-secret-key" not in a and a != b  # a fresh salt each time
    scheme, salt, digest = a.split("$")
    assert scheme == "sha256" and len(digest) == 64 and digest == hash_key("super-secret-key", salt)


def test_a_plain_key_in_the_file_is_refused():
    spec = TenantsFile.model_validate({"tenants": [{"id": "x", "api_key_hashes": ["my-plain-key"]}]})
    with pytest.raises(ValueError, match="sha256"):
        TenantRegistry(spec)


def test_keys_map_to_their_tenants_with_either_salt_style():
    reg = registry()
    assert reg.authenticate("acme-key").id == "acme"
    assert reg.authenticate("globex-key").id == "globex"


@pytest.mark.parametrize("credential", [None, "", "wrong-key", "acme-key ", "ACME-KEY", "a.b.c"])
def test_every_failure_has_one_message(credential):
    with pytest.raises(Unauthenticated) as err:
        registry(**JWT_HS).authenticate(credential)
    assert str(err.value) == AUTH_FAILED


def test_load_from_file(tmp_path):
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": [{"id": "t", "api_key_hashes": [hash_line("k")]}]}))
    assert TenantRegistry.load(path).authenticate("k").id == "t"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="tenants file"):
        TenantRegistry.load(path)


def test_jwt_hs256_valid_token_names_the_tenant():
    assert registry(**JWT_HS).authenticate(token({})).id == "acme"
    assert registry(**JWT_HS).authenticate(token({"tenant": "globex"})).id == "globex"


@pytest.mark.parametrize("claims", [
    {"exp": int(time.time()) - 10},  # expired
    {"aud": "someone-else"},
    {"iss": "https://evil.test"},
    {"tenant": "nobody"},  # no such tenant
    {"tenant": None},
])
def test_jwt_hs256_bad_tokens_are_refused(claims):
    with pytest.raises(Unauthenticated, match=AUTH_FAILED):
        registry(**JWT_HS).authenticate(token(claims))


def test_jwt_wrong_secret_missing_exp_and_unconfigured_algorithm_are_refused():
    reg = registry(**JWT_HS)
    with pytest.raises(Unauthenticated):
        reg.authenticate(token({}, key="another-secret-another-secret-another"))
    no_exp = jwt.encode({"tenant": "acme", "iss": "https://auth.test", "aud": "moemesh"}, SECRET, algorithm="HS256")
    with pytest.raises(Unauthenticated):
        reg.authenticate(no_exp)
    with pytest.raises(Unauthenticated):  # alg "none"
        reg.authenticate(jwt.encode({"tenant": "acme", "exp": int(time.time()) + 60}, None, algorithm="none"))
    with pytest.raises(Unauthenticated):  # no jwt section: tokens are just unknown keys
        registry().authenticate(token({}))


def test_jwt_rs256_with_a_public_key():
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    reg = registry(jwt={"issuer": "https://auth.test", "audience": "moemesh", "algorithms": ["RS256"],
                        "public_key": pem, "tenant_claim": "org"})
    assert reg.authenticate(token({"org": "globex"}, key=private, algorithm="RS256")).id == "globex"
    with pytest.raises(Unauthenticated):  # HS256 with the public key as secret (algorithm confusion)
        reg.authenticate(token({"org": "globex"}, key=SECRET, algorithm="HS256"))


def test_jwt_settings_need_their_keys():
    with pytest.raises(ValueError, match="HS256 needs"):
        TenantsFile.model_validate({"jwt": {"algorithms": ["HS256"]}, "tenants": [{"id": "a"}]})


def test_allow_list_and_priority():
    acme = registry().authenticate("acme-key")
    globex = registry().authenticate("globex-key")
    assert acme.allows("demo-moe") and not acme.allows("other")
    with pytest.raises(PermissionDenied):
        acme.check_model("other")
    assert globex.allows("anything")  # empty list: every model
    assert acme.effective_priority(0) == 3  # the tenant's own when none is asked for
    assert acme.effective_priority(5) == 5
    assert acme.effective_priority(9) == 6  # capped
    assert globex.effective_priority(9) == 0  # max_priority defaults to priority


def test_open_mode_is_the_default_tenant_with_everything():
    auth = Authenticator()
    assert auth.authenticate(None) is OPEN_TENANT and OPEN_TENANT.id == "default"
    assert OPEN_TENANT.allows("any") and OPEN_TENANT.effective_priority(7) == 7
    assert OPEN_TENANT.requests_per_second is None and OPEN_TENANT.tokens_per_minute is None


def test_credentials_from_headers_and_metadata():
    assert credential_from_headers("Bearer abc", None) == "abc"
    assert credential_from_headers("bearer  abc ", None) == "abc"
    assert credential_from_headers("Basic abc", None) is None
    assert credential_from_headers("Bearer ", None) is None
    assert credential_from_headers(None, "xyz") == "xyz"
    assert credential_from_metadata([("authorization", "Bearer k1")]) == "k1"
    assert credential_from_metadata((("x-api-key", "k2"), ("user-agent", "grpc"))) == "k2"
    assert credential_from_metadata(None) is None


def test_cli_hash_key_prints_a_line_that_authenticates():
    runner = CliRunner()
    line = runner.invoke(cli, ["hash-key", "--salt", "s1"], input="cli-key\n").stdout.strip().splitlines()[-1]
    assert "cli-key" not in line and line.startswith("sha256$s1$")
    reg = TenantRegistry(TenantsFile.model_validate({"tenants": [{"id": "c", "api_key_hashes": [line]}]}))
    assert reg.authenticate("cli-key").id == "c"
    generated = runner.invoke(cli, ["hash-key", "--generate"])
    assert generated.exit_code == 0
    key = generated.stderr.split("key: ")[1].strip()
    reg = TenantRegistry(TenantsFile.model_validate(
        {"tenants": [{"id": "g", "api_key_hashes": [generated.stdout.strip()]}]}))
    assert reg.authenticate(key).id == "g"


def test_start_generation_carries_tenant_priority_and_charges_the_limiter():
    import asyncio

    from moemesh.gateway.config import GatewayConfig
    from moemesh.gateway.deps import GatewayDeps
    from moemesh.gateway.generation import start_generation
    from moemesh.gateway.ratelimit import RateLimiter
    from moemesh.services.core.errors import Overloaded
    from moemesh.v1 import common_pb2, generation_pb2, models_pb2

    class Catalogue:
        async def resolve(self, model_id, kind, tenant):
            return models_pb2.ModelInfo(id=model_id or "demo-moe", kind=kind, max_context_tokens=512,
                                        max_output_tokens=256)

    acme = registry().authenticate("acme-key").model_copy(update={"requests_per_second": 1.0})
    deps = GatewayDeps(config=GatewayConfig(scheduler="127.0.0.1:1"), client=None, catalogue=Catalogue(),
                       limiter=RateLimiter(None))

    async def go():
        request = generation_pb2.GenerateRequest(model="demo-moe", prompt=common_pb2.Prompt(text="x"), priority=9)
        generation = await start_generation(deps, request, tenant=acme, timeout=None)
        assert generation.work.tenant == "acme" and generation.tenant == "acme"
        assert generation.work.priority == 6  # capped by the tenant's max_priority
        with pytest.raises(Overloaded):
            await start_generation(deps, request, tenant=acme, timeout=None)
        with pytest.raises(PermissionDenied):
            await start_generation(deps, generation_pb2.GenerateRequest(model="other", prompt=common_pb2.Prompt(text="x")),
                                   tenant=acme, timeout=None)

    asyncio.run(go())
