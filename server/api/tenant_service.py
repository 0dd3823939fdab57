"""The gRPC `loraplex.v1.TenantAdmin` service (scope "admin"): tenants' and adapters' quotas and usage, and
reloading the quotas while the server runs (the same reload as SIGHUP: server/app.py `reload_quotas`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from loraplex.server.api.generation_service import authorize, encode_quota_status
from loraplex.server.core.auth import Authenticator
from loraplex.server.core.errors import FailedPrecondition
from loraplex.server.core.quota_config import QuotaSettings
from loraplex.server.core.scheduler import Scheduler
from loraplex.v1 import tenants_pb2 as pb
from loraplex.v1 import tenants_pb2_grpc as pb_grpc


class TenantService(pb_grpc.TenantAdminServicer):
    """Read-outs from `scheduler`; `reload()` reads the quotas again and puts them in force (ValueError, with
    what is wrong, when they are invalid: the quotas in force stay)."""

    def __init__(self, scheduler: Scheduler, auth: Authenticator, reload: Callable[[], QuotaSettings]) -> None:
        self._scheduler, self._auth, self._reload = scheduler, auth, reload

    async def ListTenants(self, request: pb.ListTenantsRequest, context: grpc.aio.ServicerContext,
                          ) -> pb.ListTenantsResponse:
        authorize(self._auth, context, "admin")
        return self._listing()

    async def ReloadQuotas(self, request: pb.ReloadQuotasRequest, context: grpc.aio.ServicerContext,
                           ) -> pb.ListTenantsResponse:
        authorize(self._auth, context, "admin")
        try:
            await asyncio.to_thread(self._reload)  # reads a file
        except ValueError as error:
            raise FailedPrecondition(f"quotas not reloaded (the previous ones stay in force): {error}") from None
        return self._listing()

    def _listing(self) -> pb.ListTenantsResponse:
        tenants, adapters = self._scheduler.quota_statuses()
        return pb.ListTenantsResponse(tenants=[encode_quota_status(status) for status in tenants],
                                      adapters=[encode_quota_status(status) for status in adapters])
