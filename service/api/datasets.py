"""DatasetService: streams uploads into the content-addressed store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fitserve.v1 import dataset_pb2, dataset_pb2_grpc
from service.api import converters
from service.api.access import Access
from service.api.auth import audit
from service.api.paging import page
from service.api.status import Context, RpcOutcomes, Servicer, unary
from service.domain.datasets.store import DatasetStore, DatasetUpload
from service.errors import InvalidRequest
from service.metrics import Metrics

T = TypeVar("T")


class DatasetServicer(Servicer, dataset_pb2_grpc.DatasetServiceServicer):
    """Thin handlers over the dataset store; file work runs in threads."""

    def __init__(
        self,
        outcomes: RpcOutcomes,
        store: DatasetStore,
        metrics: Metrics,
        access: Access | None = None,
    ) -> None:
        super().__init__(outcomes)
        self._store, self._metrics = store, metrics
        self._access = access  # ownership and quotas; None: every caller may do anything

    @unary
    async def UploadDataset(
        self, request_iterator: AsyncIterator[dataset_pb2.UploadDatasetRequest], context: Context
    ) -> dataset_pb2.Dataset:
        """Store a client-streamed .npz (a header, then chunks) content-addressed by sha256; a
        bad header or archive is INVALID_ARGUMENT and leaves nothing behind."""
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("header"):
            raise InvalidRequest(
                "the first message of an upload must be the header", field="header"
            )
        h = first.header
        budget = None if self._access is None else await self._access.dataset_budget(h.name)
        upload = await _settled(self._store.begin_upload, h.name, h.format, h.size_bytes, h.sha256)
        received = 0
        try:
            async for message in request_iterator:
                if not message.HasField("chunk"):
                    raise InvalidRequest("only the first message may be a header", field="header")
                received += len(message.chunk)
                if budget is not None and received > budget:
                    assert self._access is not None
                    raise self._access.over_budget(h.name, received, budget)
                await _settled(upload.write, message.chunk)
            info = await _settled(upload.finish)
        finally:
            upload.abort()
        if self._access is not None:
            await self._access.dataset_stored(info.name)
        self._metrics.datasets_uploaded_bytes.inc(info.size_bytes)
        return converters.dataset_to_proto(info)

    @unary
    async def GetDataset(
        self, request: dataset_pb2.GetDatasetRequest, context: Context
    ) -> dataset_pb2.Dataset:
        """A stored dataset by id or name; NOT_FOUND when there is none."""
        info = await asyncio.to_thread(self._store.get, _ref(request.dataset))
        return converters.dataset_to_proto(info)

    @unary
    async def ListDatasets(
        self, request: dataset_pb2.ListDatasetsRequest, context: Context
    ) -> dataset_pb2.ListDatasetsResponse:
        """Stored datasets, newest first, a page at a time; INVALID_ARGUMENT for a page_size
        over the maximum or a page_token this server did not issue."""
        wanted = page(request.page_size, request.page_token)
        chunk, token = wanted.of(await asyncio.to_thread(self._store.list))
        return dataset_pb2.ListDatasetsResponse(
            datasets=[converters.dataset_to_proto(i) for i in chunk], next_page_token=token
        )

    @unary
    async def DeleteDataset(
        self, request: dataset_pb2.DeleteDatasetRequest, context: Context
    ) -> dataset_pb2.DeleteDatasetResponse:
        """Delete a stored dataset; NOT_FOUND when there is none."""
        ref = _ref(request.dataset)
        names = [] if self._access is None else await self._access.check_dataset(ref)
        await asyncio.to_thread(self._store.delete, ref)
        if self._access is not None:
            await self._access.dataset_deleted(names)
        audit("dataset.delete", dataset=ref)
        return dataset_pb2.DeleteDatasetResponse()


async def _settled(fn: Callable[..., T], *args: Any) -> T:
    """Run file work in a thread; if the client goes away meanwhile, let the thread finish
    before the cancellation goes on, so the cleanup never races a half-done write (and an
    upload opened just as the client cancelled is still aborted)."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        done: object = None if work.cancelled() or work.exception() else work.result()
        if isinstance(done, DatasetUpload):
            done.abort()
        raise


def _ref(value: str) -> str:
    if not value:
        raise InvalidRequest("dataset is required (an id 'sha256:...' or a name)", field="dataset")
    return value
