"""The gRPC `loraplex.v1.AdapterAdmin` service: thin handlers over `AdapterManager`, scope "admin".

Every handler authorizes, runs the manager call on the manager's low-priority admin threads (stores
and sources do disk and network I/O and hash; the event loop and the engine keep serving generation
meanwhile), and encodes the result. Refusals from the adapters package become core errors
(`adapter_runtime.admin.request_errors`), which the interceptor maps to codes.
"""

from __future__ import annotations

import grpc

from loraplex.adapters.errors import AdapterFormatError
from loraplex.adapters.validation import AdapterSummary
from loraplex.server.api.generation_service import authorize
from loraplex.server.core.adapter_runtime.admin import request_errors
from loraplex.server.core.adapter_runtime.manager import AdapterManager
from loraplex.server.core.adapter_runtime.status import AdapterStatus, VersionStatus
from loraplex.server.core.auth import Authenticator
from loraplex.v1 import admin_pb2 as pb
from loraplex.v1 import admin_pb2_grpc as pb_grpc

TIERS = {"device": pb.ADAPTER_TIER_DEVICE, "host": pb.ADAPTER_TIER_HOST, "store": pb.ADAPTER_TIER_STORE}
DEADLINE_MARGIN_S = 0.5
"""An UnloadAdapter that waits answers this long before the caller's deadline."""


class AdminService(pb_grpc.AdapterAdminServicer):
    def __init__(self, adapters: AdapterManager, auth: Authenticator) -> None:
        self._adapters = adapters
        self._auth = auth

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext,
                          ) -> pb.LoadAdapterResponse:
        authorize(self._auth, context, "admin")
        with request_errors():
            entry, _, changed = await self._adapters.run_admin(self._adapters.load, request.source, request.name,
                                                               request.warm)
        status = await self._adapters.run_admin(self._adapters.status, entry.name)
        return pb.LoadAdapterResponse(adapter=encode_status(status), changed=changed)

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext,
                            ) -> pb.UnloadAdapterResponse:
        authorize(self._auth, context, "admin")
        remaining = context.time_remaining()
        timeout = None if remaining is None else max(remaining - DEADLINE_MARGIN_S, 0.0)
        removed, drained = await self._adapters.run_admin(self._adapters.unload, request.name, request.version,
                                                          request.wait, timeout)
        return pb.UnloadAdapterResponse(removed_versions=removed, drained=drained)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext,
                           ) -> pb.ListAdaptersResponse:
        authorize(self._auth, context, "admin")
        return await self._listing()

    async def adapter_listing(self, authorization: str | None) -> pb.ListAdaptersResponse:
        """ListAdapters for a caller of another transport (the HTTP shim's GET /v1/admin/adapters):
        `authorization` is its header value ("Bearer KEY"), which needs scope "admin"."""
        self._auth.authorize(authorization, "admin")
        return await self._listing()

    async def _listing(self) -> pb.ListAdaptersResponse:
        statuses = await self._adapters.run_admin(self._adapters.statuses)
        return pb.ListAdaptersResponse(adapters=[encode_status(status) for status in statuses])

    async def DescribeAdapter(self, request: pb.DescribeAdapterRequest, context: grpc.aio.ServicerContext,
                              ) -> pb.AdapterStatus:
        authorize(self._auth, context, "admin")
        return encode_status(await self._adapters.run_admin(self._adapters.status, request.name))

    async def ValidateAdapter(self, request: pb.ValidateAdapterRequest, context: grpc.aio.ServicerContext,
                              ) -> pb.ValidateAdapterResponse:
        authorize(self._auth, context, "admin")
        try:
            with request_errors(adapter_format=False):
                summary = await self._adapters.run_admin(self._adapters.validate, request.source)
        except AdapterFormatError as problem:
            return pb.ValidateAdapterResponse(valid=False, problem=str(problem))
        return pb.ValidateAdapterResponse(valid=True, summary=encode_summary(summary))

    async def PinAdapter(self, request: pb.PinAdapterRequest, context: grpc.aio.ServicerContext,
                         ) -> pb.AdapterStatus:
        authorize(self._auth, context, "admin")
        with request_errors():
            entry = await self._adapters.run_admin(self._adapters.pin, request.name, request.pinned)
        return encode_status(await self._adapters.run_admin(self._adapters.status, entry.name))

    async def PrefetchAdapter(self, request: pb.PrefetchAdapterRequest, context: grpc.aio.ServicerContext,
                              ) -> pb.AdapterStatus:
        authorize(self._auth, context, "admin")
        lease = await self._adapters.run_admin(self._adapters.prefetch, request.adapter)
        return encode_status(await self._adapters.run_admin(self._adapters.status, lease.name))


def encode_summary(summary: AdapterSummary) -> pb.AdapterVersion:
    return pb.AdapterVersion(digest=summary.digest, rank=summary.rank, targets=summary.targets,
                             size_bytes=summary.size_bytes, dtype=summary.dtype)


def encode_version(version: VersionStatus) -> pb.AdapterVersion:
    encoded = encode_summary(version.summary) if version.summary else pb.AdapterVersion(digest=version.digest)
    encoded.tier = TIERS[version.tier]
    encoded.active_requests = version.active_requests
    encoded.problem = version.problem
    return encoded


def encode_status(status: AdapterStatus) -> pb.AdapterStatus:
    return pb.AdapterStatus(
        name=status.name, current_version=status.current, pinned=status.pinned,
        versions=[encode_version(version) for version in status.versions], requests_total=status.requests_total,
        active_requests=sum(version.active_requests for version in status.versions),
    )
