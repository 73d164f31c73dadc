"""gateway.catalogue: which model a request names, and whether its absence is a client error or a retryable one.
(Through a real mesh whose only worker is lost and comes back: tests/integration/test_faults.py.)"""

from __future__ import annotations

import asyncio

import pytest

from moemesh.gateway import catalogue as catalogue_module
from moemesh.gateway.catalogue import ModelCatalogue
from moemesh.gateway.tenants import OPEN_TENANT, Tenant
from moemesh.services.core.errors import InvalidRequest, Unavailable
from moemesh.v1 import models_pb2

GENERATION, EMBEDDING = models_pb2.MODEL_KIND_GENERATION, models_pb2.MODEL_KIND_EMBEDDING


class Scheduler:
    """ListModels as the test sets it."""

    def __init__(self) -> None:
        self.served: list[tuple[str, int]] = []

    async def list_models(self, timeout: float = 5.0) -> models_pb2.ListModelsResponse:
        return models_pb2.ListModelsResponse(models=[models_pb2.ModelInfo(id=i, kind=k) for i, k in self.served])


@pytest.fixture
def mesh(monkeypatch):
    monkeypatch.setattr(catalogue_module, "REFRESH_SECONDS", -1.0)  # every call asks the scheduler
    scheduler = Scheduler()
    return scheduler, ModelCatalogue(scheduler, None, None)


def resolve(catalogue: ModelCatalogue, model: str, kind: int = GENERATION, tenant: Tenant = OPEN_TENANT):
    return asyncio.run(catalogue.resolve(model, kind, tenant))


def test_a_served_model_resolves_and_an_unknown_one_is_a_client_error_listing_the_served(mesh):
    scheduler, catalogue = mesh
    scheduler.served = [("moe", GENERATION), ("other", GENERATION), ("minilm", EMBEDDING)]
    assert resolve(catalogue, "moe").id == "moe"
    with pytest.raises(InvalidRequest) as caught:
        resolve(catalogue, "typo")
    assert caught.value.field == "model" and str(caught.value).endswith("unknown model 'typo'; served: moe, other")


def test_a_model_served_before_is_unavailable_while_no_replica_is_ready_then_served_again(mesh):
    scheduler, catalogue = mesh
    scheduler.served = [("moe", GENERATION), ("small", GENERATION)]
    resolve(catalogue, "moe")
    scheduler.served = [("small", GENERATION), ("minilm", EMBEDDING)]  # moe's only replica was lost
    with pytest.raises(Unavailable, match="'moe' has no ready replica at the moment; retry"):
        resolve(catalogue, "moe")
    with pytest.raises(InvalidRequest):  # seen as a generation model, not as an embedding model
        resolve(catalogue, "moe", EMBEDDING)
    scheduler.served = [("small", GENERATION), ("moe", GENERATION)]
    assert resolve(catalogue, "moe").id == "moe"


def test_while_nothing_of_the_kind_is_served_any_name_is_unavailable(mesh):
    scheduler, catalogue = mesh
    scheduler.served = [("minilm", EMBEDDING)]  # a mesh starting up: its generation workers still loading
    with pytest.raises(Unavailable, match="no model of this kind is being served yet, 'moe' included; retry"):
        resolve(catalogue, "moe")
    with pytest.raises(Unavailable):
        resolve(catalogue, "")
    assert resolve(catalogue, "minilm", EMBEDDING).id == "minilm"


def test_a_restricted_tenant_learns_only_of_its_own_models(mesh):
    scheduler, catalogue = mesh
    tenant = Tenant(id="acme", allowed_models=frozenset({"moe"}))
    scheduler.served = [("moe", GENERATION), ("secret", GENERATION)]
    resolve(catalogue, "secret")  # seen by the catalogue (another tenant's request)
    scheduler.served = [("moe", GENERATION)]
    with pytest.raises(InvalidRequest) as caught:
        resolve(catalogue, "secret", tenant=tenant)
    assert str(caught.value).endswith("unknown model 'secret'; served: moe"), "no 503 that would tell it existed"
    with pytest.raises(InvalidRequest) as caught:
        resolve(catalogue, "nope", tenant=Tenant(id="none", allowed_models=frozenset({"elsewhere"})))
    assert str(caught.value).endswith("served: none for this API key")
