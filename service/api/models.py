"""ModelService: reads the model store and manages aliases."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from fitserve.v1 import model_pb2, model_pb2_grpc
from service.api import converters
from service.api.access import Access
from service.api.auth import audit, current_caller
from service.api.paging import page
from service.api.status import Context, RpcOutcomes, Servicer, unary
from service.domain.model_events import CHANNEL, ModelEvent
from service.domain.model_store import ModelStore
from service.domain.resource_names import check_name
from service.errors import InvalidRequest, NotFound

log = logging.getLogger(__name__)


class ModelServicer(Servicer, model_pb2_grpc.ModelServiceServicer):
    """Thin handlers over the model store; file work runs in threads."""

    def __init__(
        self,
        outcomes: RpcOutcomes,
        store: ModelStore,
        events: aioredis.Redis | None = None,
        access: Access | None = None,
    ) -> None:
        super().__init__(outcomes)
        self._store = store
        self._events = events
        self._access = access  # ownership; None: every caller may change every model

    async def _check_owner(self, name: str) -> None:
        if self._access is not None:
            await self._access.check_model(name)

    async def _publish(self, event: ModelEvent) -> None:
        """Tell inference servers to re-resolve; best effort, they also poll the store."""
        if self._events is None:
            return
        try:
            await self._events.publish(CHANNEL, event.encode())
        except Exception as exc:
            log.warning("could not publish %s (servers pick it up by polling): %s", event, exc)

    @unary
    async def ListModels(
        self, request: model_pb2.ListModelsRequest, context: Context
    ) -> model_pb2.ListModelsResponse:
        """Models by name with their latest version and aliases, a page at a time;
        INVALID_ARGUMENT for a page_size over the maximum or a page_token not issued here."""
        wanted = page(request.page_size, request.page_token)
        chunk, token = wanted.of(await asyncio.to_thread(self._store.models))
        summaries = await asyncio.to_thread(lambda: [self._summary(n) for n in chunk])
        return model_pb2.ListModelsResponse(models=summaries, next_page_token=token)

    @unary
    async def GetModel(
        self, request: model_pb2.GetModelRequest, context: Context
    ) -> model_pb2.Model:
        """A model's versions (with metadata and metrics) and aliases; NOT_FOUND when unknown."""
        # Where versions sit on the server's disk is for admins (and for all when auth is off).
        paths = current_caller().is_admin
        return await asyncio.to_thread(self._model, _name(request.name), paths)

    @unary
    async def SetAlias(
        self, request: model_pb2.SetAliasRequest, context: Context
    ) -> model_pb2.SetAliasResponse:
        """Point an alias (stable, canary, ...) at an existing version, so callers that name
        the alias switch without a redeploy; NOT_FOUND for an unknown model or version."""
        name = _name(request.model_name)
        if request.version <= 0:
            raise InvalidRequest("version must be a positive version number", field="version")
        await self._check_owner(name)
        previous = await asyncio.to_thread(
            self._store.set_alias, name, request.alias, request.version
        )
        await self._publish(ModelEvent(name, request.version, request.alias))
        audit(
            "alias.set", model=name, alias=request.alias, version=request.version, previous=previous
        )
        return model_pb2.SetAliasResponse(
            model_name=name, alias=request.alias, version=request.version, previous_version=previous
        )

    @unary
    async def DeleteAlias(
        self, request: model_pb2.DeleteAliasRequest, context: Context
    ) -> model_pb2.DeleteAliasResponse:
        """Remove an alias; NOT_FOUND when the model has no such alias."""
        name = _name(request.model_name)
        await self._check_owner(name)
        await asyncio.to_thread(self._store.delete_alias, name, request.alias)
        await self._publish(ModelEvent(name, 0, request.alias))
        audit("alias.delete", model=name, alias=request.alias)
        return model_pb2.DeleteAliasResponse()

    @unary
    async def DeleteVersion(
        self, request: model_pb2.DeleteVersionRequest, context: Context
    ) -> model_pb2.DeleteVersionResponse:
        """Delete a version; NOT_FOUND when there is none, FAILED_PRECONDITION while an alias
        points at it (move the alias first)."""
        if request.version <= 0:
            raise InvalidRequest("version must be a positive version number", field="version")
        name = _name(request.model_name)
        await self._check_owner(name)
        await asyncio.to_thread(self._store.delete_version, name, request.version)
        await self._publish(ModelEvent(name))
        audit("version.delete", model=name, version=request.version)
        return model_pb2.DeleteVersionResponse()

    def _summary(self, name: str) -> model_pb2.ModelSummary:
        versions = self._store.versions(name)
        latest = versions[-1] if versions else 0
        meta = self._store.metadata(name, latest) if latest else {}
        return model_pb2.ModelSummary(
            name=name,
            latest_version=latest,
            version_count=len(versions),
            aliases=self._store.aliases(name),
            updated_at=converters.timestamp(meta.get("created_at", 0.0)),
        )

    def _model(self, name: str, paths: bool = True) -> model_pb2.Model:
        versions = self._store.versions(name)
        if not versions:
            raise NotFound(f"model {name!r} not found; train it first or check ListModels")
        aliases = self._store.aliases(name)
        return model_pb2.Model(
            name=name,
            versions=[
                converters.version_to_proto(
                    name,
                    v,
                    self._store.metadata(name, v),
                    aliases,
                    str(self._store.path(name, v)) if paths else "",
                )
                for v in reversed(versions)
            ],
            aliases=aliases,
        )


def _name(value: str) -> str:
    if not value:
        raise InvalidRequest("model name is required", field="model_name")
    return check_name(value, "model_name", "model name")
