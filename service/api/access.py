"""What the caller of this call may change, and how much it may use: ownership and quotas.

The roles are checked before the handler (``service.api.auth``); the handlers ask
``Access`` about the objects themselves: a trainer changes only the models and datasets it
created and cancels only its own jobs; every token stays within its quotas of queued jobs
and dataset bytes (RESOURCE_EXHAUSTED naming the quota). With auth off, or for an admin,
ownership never refuses; quotas count for every token, admins included.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from service import errors
from service.api.auth import Caller, audit, current_caller
from service.config import AuthSettings
from service.domain.datasets.store import ID_PREFIX, DatasetStore
from service.domain.job_store import AsyncJobStore
from service.domain.jobs import Job, JobKind, JobState
from service.domain.model_store import ModelStore
from service.domain.ownership import Ownership

MODEL, DATASET = "model", "dataset"


class Access:
    """Ownership and quota checks for the api role's handlers."""

    def __init__(
        self,
        client: aioredis.Redis,
        jobs: AsyncJobStore,
        models: ModelStore,
        datasets: DatasetStore,
        quotas: AuthSettings,
    ) -> None:
        self.owners = Ownership(client)
        self._jobs, self._models, self._datasets = jobs, models, datasets
        self._quotas = quotas

    # --- jobs ------------------------------------------------------------------------------

    async def admit_job(self, job: Job) -> None:
        """Before a job is recorded: stamp its owner, refuse a model the caller may not
        train into, and a caller at its quota of queued and running jobs."""
        caller = current_caller()
        job.owner = caller.name
        if job.kind in (JobKind.TRAIN, JobKind.FINE_TUNE):
            await self.check_model(job.model_name, claim=True)
        if not caller.name:
            return
        limit = self._job_quota(caller)
        if (active := await self.owners.active_jobs(caller.name, self._state)) >= limit:
            raise errors.ResourceExhausted(
                f"token {caller.name!r} has {active} jobs queued or running, its quota "
                f"of queued jobs is {limit}; wait for one to finish or cancel one (an admin "
                "sets the quota: fitserve tokens create --max-queued-jobs, or "
                "FITSERVE_AUTH__MAX_QUEUED_JOBS for every token)"
            )

    async def job_recorded(self, job: Job) -> None:
        await self.owners.add_job(job.owner, job.id)
        audit(f"{job.kind.value.lower()}.submit", job=job.id, model=job.model_name)

    def check_job(self, job: Job) -> None:
        current_caller().check_owner(job.owner, f"job {job.id}")

    # --- models ----------------------------------------------------------------------------

    async def check_model(self, name: str, *, claim: bool = False) -> None:
        """Refuse a change to model ``name`` by a caller that did not create it; with
        ``claim``, a model nobody holds yet becomes the caller's."""
        caller = current_caller()
        if not caller.name:
            return
        holder = await self.owners.owner(MODEL, name)
        if not holder and claim:
            exists = await asyncio.to_thread(lambda: bool(self._models.versions(name)))
            if not exists or caller.is_admin:
                holder = await self.owners.claim(MODEL, name, caller.name)
        caller.check_owner(holder, f"model {name!r}")

    # --- datasets --------------------------------------------------------------------------

    async def dataset_budget(self, name: str) -> int | None:
        """Before an upload: refuse a name another token holds; the bytes this caller may
        still upload (None: no quota, auth is off)."""
        caller = current_caller()
        if not caller.name:
            return None
        holder = await self.owners.owner(DATASET, name)
        if holder:
            caller.check_owner(holder, f"dataset {name!r}")
        return self._dataset_quota(caller) - await self._dataset_bytes(caller.name, name)

    def over_budget(self, name: str, size: int, budget: int) -> errors.ResourceExhausted:
        caller = current_caller()
        limit = self._dataset_quota(caller)
        return errors.ResourceExhausted(
            f"dataset {name[:64]!r} would take token {caller.name!r} past its quota of "
            f"{limit} dataset bytes ({limit - budget} in use, this upload {size} so far); "
            "delete datasets it no longer needs, or ask an admin for a larger quota "
            "(fitserve tokens create --max-dataset-bytes, FITSERVE_AUTH__MAX_DATASET_BYTES)"
        )

    async def dataset_stored(self, name: str) -> None:
        caller = current_caller()
        if caller.name:
            await self.owners.claim(DATASET, name, caller.name)
        audit("dataset.upload", dataset=name)

    async def check_dataset(self, ref: str) -> list[str]:
        """The names dataset ``ref`` deletes (an id: every name it has), each of which the
        caller must own."""
        if ref.startswith(ID_PREFIX):
            names = [i.name for i in await asyncio.to_thread(self._datasets.list) if i.id == ref]
        else:
            names = [(await asyncio.to_thread(self._datasets.get, ref)).name]
        caller = current_caller()
        for name in names:
            caller.check_owner(await self.owners.owner(DATASET, name), f"dataset {name!r}")
        return names

    async def dataset_deleted(self, names: list[str]) -> None:
        for name in names:
            await self.owners.release(DATASET, name)

    # --- quotas ----------------------------------------------------------------------------

    def _job_quota(self, caller: Caller) -> int:
        own = caller.record.max_queued_jobs if caller.record else None
        return own if own is not None else self._quotas.max_queued_jobs

    def _dataset_quota(self, caller: Caller) -> int:
        own = caller.record.max_dataset_bytes if caller.record else None
        return own if own is not None else self._quotas.max_dataset_bytes

    async def _dataset_bytes(self, owner: str, replacing: str) -> int:
        """Bytes of the datasets ``owner`` holds, but for ``replacing`` (an upload under
        that name replaces it)."""
        names = set(await self.owners.owned(DATASET, owner)) - {replacing}
        if not names:
            return 0
        infos = await asyncio.to_thread(self._datasets.list)
        return sum(i.size_bytes for i in infos if i.name in names)

    async def _state(self, job_id: str) -> JobState | None:
        try:
            return await self._jobs.state(job_id)
        except errors.NotFound:
            return None
