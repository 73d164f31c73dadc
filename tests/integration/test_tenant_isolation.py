"""Tenants never learn about each other through caches: prefix KV, the KV tier, answers and embeddings are scoped.

Through a real mesh with API keys for four tenants: alpha and beta each in their own scope, and two tenants of
one organisation whose tenants-file entries name the same `cache_scope`. A tenant's `usage.cached_tokens` must
count only its own scope's prompts. The cache keys' encoding (ids holding ':' or NUL) is checked without a mesh.
"""

from __future__ import annotations

import json
import os
import uuid

import grpc
import openai
import pytest

from moemesh.cache.embeddings import EmbeddingCache
from moemesh.cache.keys import digest_of_parts, key_segment
from moemesh.cache.response import response_key
from moemesh.gateway.tenants import Tenant, cache_scope, hash_line
from moemesh.local import start_mesh, stop_mesh
from moemesh.services.core.errors import InvalidRequest
from moemesh.v1 import common_pb2, embeddings_pb2, embeddings_pb2_grpc, generation_pb2, generation_pb2_grpc, worker_pb2
from moemesh.worker.server.convert import MAX_CACHE_SCOPE_CHARS, request_from_pb

MODEL = "demo-moe"
EMBEDDER = "demo-moe-pooled"
TENANTS = {"tenants": [
    {"id": "alpha", "api_key_hashes": [hash_line("alpha-key")]},
    {"id": "beta", "api_key_hashes": [hash_line("beta-key")]},
    {"id": "acme-sales", "api_key_hashes": [hash_line("sales-key")], "cache_scope": "acme"},
    {"id": "acme-support", "api_key_hashes": [hash_line("support-key")], "cache_scope": "acme"},
]}
# Long enough for several full KV blocks (16 tokens each) whatever the tokenizer.
DOCUMENT = ("Quarterly close checklist for the finance team: reconcile every bank account, post the accruals, "
            "review open purchase orders, confirm intercompany balances, and lock the period in the ledger. ")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isolation")
    tenants_file = tmp / "tenants.json"
    tenants_file.write_text(json.dumps(TENANTS))
    # The tests count hits: a cache write past the default 0.2 s timeout (a loaded host) would be a designed miss.
    env = {"MOEMESH_GATEWAY_TENANTS_FILE": str(tenants_file), "MOEMESH_GATEWAY_CACHE_REDIS_TIMEOUT": "2"}
    os.environ.update(env)
    try:
        running = start_mesh(tmp, "--no-embeddings")
    finally:
        for name in env:
            del os.environ[name]
    yield running
    stop_mesh(running)


def complete(mesh, key: str, text: str,
             cache_mode: int = common_pb2.CACHE_MODE_NO_STORE) -> generation_pb2.GenerateResponse:
    """One greedy completion as the tenant of `key` (past the response cache unless `cache_mode` says otherwise)."""
    request = generation_pb2.GenerateRequest(
        model=MODEL, prompt=common_pb2.Prompt(text=text), cache_mode=cache_mode,
        sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0.0))
    with grpc.insecure_channel(mesh.gateway) as ch:
        return generation_pb2_grpc.GenerationStub(ch).Complete(
            request, metadata=[("authorization", f"Bearer {key}")], timeout=60)


def embed(mesh, key: str, texts: list[str]) -> embeddings_pb2.EmbedResponse:
    with grpc.insecure_channel(mesh.gateway) as ch:
        return embeddings_pb2_grpc.EmbeddingsStub(ch).Embed(
            embeddings_pb2.EmbedRequest(model=EMBEDDER, inputs=texts),
            metadata=[("authorization", f"Bearer {key}")], timeout=60)


def fresh_document() -> str:
    """A prompt no earlier test sent (the mesh is shared by the module)."""
    return f"[{uuid.uuid4().hex}] " + DOCUMENT * 2


# ---- through the mesh ------------------------------------------------------------------------------------------


def test_another_tenants_prompt_is_never_a_prefix_hit(mesh):
    document = fresh_document()
    first = complete(mesh, "alpha-key", document)
    assert first.usage.cached_tokens == 0 and first.usage.prompt_tokens >= 64
    other = complete(mesh, "beta-key", document)
    assert other.usage.cached_tokens == 0, (
        f"beta's cached_tokens ({other.usage.cached_tokens}) reveal that alpha sent this prompt")
    again = complete(mesh, "alpha-key", document)
    assert again.usage.cached_tokens >= 48, "alpha's own repeat must still reuse its prefix blocks"
    assert again.text == first.text == other.text


def test_tenants_sharing_a_configured_scope_share_prefixes_and_answers(mesh):
    document = fresh_document()
    assert complete(mesh, "sales-key", document).usage.cached_tokens == 0
    shared = complete(mesh, "support-key", document)
    assert shared.usage.cached_tokens >= 48, "tenants naming one cache_scope share prefix KV"
    assert complete(mesh, "beta-key", document).usage.cached_tokens == 0, "outside the scope: no hit"

    question = fresh_document()
    answer = complete(mesh, "sales-key", question, common_pb2.CACHE_MODE_DEFAULT)
    replay = complete(mesh, "support-key", question, common_pb2.CACHE_MODE_DEFAULT)
    assert replay.usage.from_response_cache and replay.text == answer.text
    assert not complete(mesh, "alpha-key", question, common_pb2.CACHE_MODE_DEFAULT).usage.from_response_cache


def test_the_openai_route_reports_no_cached_tokens_for_another_tenants_prompt(mesh):
    document = fresh_document()
    complete(mesh, "alpha-key", document)
    with openai.OpenAI(base_url=f"http://{mesh.http}/v1", api_key="beta-key", max_retries=0, timeout=60) as client:
        completion = client.completions.create(model=MODEL, prompt=document, max_tokens=2, temperature=0.7)
    assert completion.usage.prompt_tokens_details.cached_tokens == 0


def test_the_embedding_cache_is_scoped_by_tenant(mesh):
    text = f"overdue invoice {uuid.uuid4().hex}"
    assert embed(mesh, "alpha-key", [text]).usage.cached_tokens == 0
    probe = embed(mesh, "beta-key", [text])
    assert probe.usage.cached_tokens == 0, "beta's probe must not learn that alpha embedded this text"
    assert embed(mesh, "alpha-key", [text]).usage.cached_tokens > 0, "alpha's own repeat is a hit"

    text = f"renewal quote {uuid.uuid4().hex}"
    embed(mesh, "sales-key", [text])
    assert embed(mesh, "support-key", [text]).usage.cached_tokens > 0, "one configured scope shares embeddings"


# ---- scopes and keys, without a mesh ----------------------------------------------------------------------------


def test_cache_scopes_are_distinct_per_tenant_unless_configured_or_shared():
    alpha, scoped = Tenant(id="alpha"), Tenant(id="x", cache_scope="alpha")
    assert cache_scope(alpha) == "tenant:alpha" and cache_scope(scoped) == "scope:alpha"
    assert cache_scope(alpha) != cache_scope(scoped), "a configured scope never equals a tenant's own"
    assert cache_scope(alpha, shared=True) == cache_scope(scoped, shared=True) == "shared"
    assert cache_scope(Tenant(id="shared")) != "shared"


def test_ids_holding_separators_never_share_a_response_or_embedding_key():
    request = generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(text="c"))
    triples = [("tenant:a:b", "c", "r"), ("tenant:a", "b:c", "r"), ("tenant:a", "b", "c:r"),
               ("tenant:a\0b", "c", "r"), ("tenant:a", "b\0c", "r"), ("tenant:a", "b", "c\0r")]
    assert len({response_key(s, m, r, request) for s, m, r in triples}) == len(triples)
    assert len({EmbeddingCache.key(m, r, True, "t", scope=s) for s, m, r in triples}) == len(triples)
    # The text is last: an id ending where the text begins must not collide either.
    assert EmbeddingCache.key("m", "r", True, "\0x", scope="s") != EmbeddingCache.key("m", "r\0", True, "x", scope="s")
    assert EmbeddingCache.key("m", "r", True, "t", scope="tenant:a") != EmbeddingCache.key("m", "r", True, "t")


def test_key_encodings_are_injective():
    values = ["a:b", "a%3Ab", "a", "b:c", "", "%", "ä", "\ud800"]
    assert len({key_segment(v) for v in values}) == len(values)
    assert all(":" not in key_segment(v) for v in values)
    assert digest_of_parts("ab", "c").digest() != digest_of_parts("a", "bc").digest()
    assert digest_of_parts("a", b"").digest() != digest_of_parts("a").digest()


def test_a_cache_scope_past_its_limit_is_invalid_argument_naming_the_field():
    too_long = "t" * (MAX_CACHE_SCOPE_CHARS + 1)
    work = worker_pb2.GenerationWork(request_id="r", prompt_token_ids=[1, 2, 3], cache_scope=too_long)
    with pytest.raises(InvalidRequest) as err:
        request_from_pb(work, tokenizer=None, defaults={})
    assert err.value.field == "cache_scope" and err.value.code == InvalidRequest.code
    work.cache_scope = "tenant:alpha"
    assert request_from_pb(work, tokenizer=None, defaults={}).cache_scope == "tenant:alpha"
