"""FastAPI dependencies of the HTTP routes: the gateway's dependencies object and the caller's tenant.

`create_app` keeps the one `GatewayDeps` in `app.state`; a route declares `deps: Deps` and `tenant: Caller`.
"""

from __future__ import annotations

from typing import Annotated

import fastapi

from moemesh.gateway.deps import GatewayDeps
from moemesh.gateway.tenants import Tenant, credential_from_headers
from moemesh.services.core.errors import Unauthenticated
from moemesh.services.core.tracing import span


async def gateway_deps(request: fastapi.Request) -> GatewayDeps:
    """The app's dependencies object."""
    return request.app.state.deps


def caller_tenant(request: fastapi.Request, deps: Annotated[GatewayDeps, fastapi.Depends(gateway_deps)]) -> Tenant:
    """The caller's tenant from `Authorization: Bearer <key or JWT>` (or `X-API-Key`).

    Dependencies run before the body is validated, so an unauthenticated caller gets 401 whatever it sent; the
    refusal is audited with its reason.
    """
    try:
        with span("auth"):
            return deps.auth.authenticate(credential_from_headers(request.headers.get("authorization"),
                                                                  request.headers.get("x-api-key")))
    except Unauthenticated as exc:
        deps.audit.refused(exc, transport="http", method=f"{request.method} {request.url.path}",
                           peer=request.client.host if request.client else None)
        raise


Deps = Annotated[GatewayDeps, fastapi.Depends(gateway_deps)]
Caller = Annotated[Tenant, fastapi.Depends(caller_tenant)]
