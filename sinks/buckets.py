"""Customer-owned buckets (docs/storage.md): an organization's event objects go to its own bucket,
reached through a profile of the AWS shared config files (static keys, or a role to assume).

`RoutedObjects` is an `ObjectWriter` for the deployment's bucket that also knows the customer
buckets of `organization_buckets` (migration 0011):
- `bucket_for(org)` names the organization's current bucket, so the flush writes its objects
  there and its pointers name it;
- `put` and `get_range` pick the client of the bucket they are given: a pointer keeps the bucket
  it was written to, and a retired row still says how to reach it, so old pointers keep reading;
- a customer bucket's clients are created on first use, one per (profile, endpoint, region).

One tenant's bucket must not stop everyone's ingest: any failure of a customer bucket is raised
as `CustomerBucketUnavailable`, which the retry policy treats as an outage (retried) rather
than as a configuration error of the deployment (which stops the worker); once the bucket has
failed for `outage_s`, uploads to it raise `BucketUnavailable` and the flush dead-letters its
events (`storage_unavailable`) instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aioboto3
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.processing.store import BucketUnavailable
from sinks.db import Connection
from sinks.objects import ObjectWriter

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger("omnilog.buckets")

_ROUTES = """
SELECT organization_id::text AS organization_id, bucket, endpoint_url, region, profile,
       retired_at IS NOT NULL AS retired
  FROM organization_buckets
 ORDER BY organization_id, created_at
"""


@dataclass(frozen=True, slots=True)
class BucketRoute:
    """How to reach one organization's bucket; `retired`: no new objects go there."""

    organization_id: str
    bucket: str
    endpoint_url: str | None
    region: str | None
    profile: str
    retired: bool = False

    @property
    def reach(self) -> tuple[str, str | None, str | None]:
        """What a client is made of: two routes with the same reach share one client."""
        return (self.profile, self.endpoint_url, self.region)

    def describe(self) -> str:
        where = self.endpoint_url or "AWS S3"
        return (
            f"organization {self.organization_id}: bucket {self.bucket!r} at {where} "
            f"with AWS profile {self.profile!r}"
        )


async def load_routes(conn: Connection) -> list[BucketRoute]:
    """Every route the connection may see (the API role: its own organization's, by row security)."""
    return [BucketRoute(**dict(r)) for r in await conn.fetch(_ROUTES)]


class CustomerBucketUnavailable(ClientError):
    """A customer bucket refused or failed a request.

    A ClientError with status 503, so the retry policy judges it an outage of that bucket (retried
    with backoff) rather than a fault of the deployment: a customer's revoked role or deleted
    bucket must never make the worker stop (and its partitions with it) as a 403 of our own
    bucket does.
    """

    def __init__(self, route: BucketRoute, cause: BaseException) -> None:
        message = f"{route.describe()}: {type(cause).__name__}: {cause}"
        super().__init__(
            {
                "Error": {"Code": "CustomerBucketUnavailable", "Message": message},
                "ResponseMetadata": {"HTTPStatusCode": 503},  # type: ignore[typeddict-item]
            },
            "CustomerBucket",
        )
        self.route = route


class UnknownBucket(LookupError):
    """A bucket that is neither the deployment's nor any known organization's."""


def customer_client(route: BucketRoute) -> AbstractAsyncContextManager[S3Client]:
    """A client for `route`'s bucket with the credentials of its profile (botocore's standard
    providers: static keys, assume-role, web identity...). Raises ProfileNotFound at once."""
    session = aioboto3.Session(profile_name=route.profile)
    return session.client(
        "s3",
        endpoint_url=route.endpoint_url,
        region_name=route.region,  # None: the profile's region
        config=AioConfig(
            s3={"addressing_style": "path"} if route.endpoint_url else {},
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=16,
            connect_timeout=5,
            read_timeout=30,
        ),
    )


async def check_route(route: BucketRoute) -> None:
    """Fail fast, naming the organization and profile, when the bucket is not usable: an unknown
    profile, credentials the bucket refuses, or no such bucket. Writes nothing."""
    try:
        async with customer_client(route) as client:
            await client.head_bucket(Bucket=route.bucket)
    except (BotoCoreError, ClientError, OSError) as exc:
        raise CustomerBucketUnavailable(route, exc) from exc


class RoutedObjects(ObjectWriter):
    """The deployment's bucket plus the customer buckets of `organization_buckets`."""

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        multipart_threshold: int,
        concurrency: int = 8,
        *,
        outage_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(client, bucket, multipart_threshold, concurrency)
        self._outage_s = outage_s  # how long a customer bucket may fail before we give up on it
        self._clock = clock
        self._failing_since: dict[str, float] = {}  # customer bucket -> its first failed upload
        self._current: dict[str, BucketRoute] = {}  # organization -> where its new objects go
        self._by_bucket: dict[str, BucketRoute] = {}  # any bucket a pointer may name
        self._customer_clients: dict[tuple[str, str | None, str | None], S3Client] = {}
        self._writers: dict[str, _CustomerWriter] = {}  # customer bucket -> its writer
        self._clients = contextlib.AsyncExitStack()
        self._opening = asyncio.Lock()

    # ---- routes -----------------------------------------------------------------------------

    def use_routes(self, routes: Iterable[BucketRoute]) -> None:
        """Replace the known routes (a refresh): new batches follow them at once."""
        self._current, self._by_bucket = {}, {}
        self.learn(routes)

    def learn(self, routes: Iterable[BucketRoute]) -> None:
        """Add routes to the known ones (the API learns each organization's as it reads)."""
        for route in routes:
            if route.bucket == self.bucket:
                # Refused by `omnilog buckets set`; a row written by hand must not hand our own
                # bucket to a customer's credentials.
                log.error("ignoring a customer route to the deployment's bucket: %s", route.describe())
                continue
            self._by_bucket[route.bucket] = route
            if not route.retired:
                self._current[route.organization_id] = route

    async def refresh(self, conn: Connection) -> None:
        self.use_routes(await load_routes(conn))

    def routes(self) -> list[BucketRoute]:
        return sorted(self._by_bucket.values(), key=lambda r: (r.organization_id, r.bucket))

    def bucket_for(self, organization_id: str) -> str:
        route = self._current.get(organization_id)
        return route.bucket if route else self.bucket

    # ---- I/O ----------------------------------------------------------------------------------

    async def put(self, key: str, body: bytes, *, bucket: str | None = None) -> None:
        if bucket is None or bucket == self.bucket:
            await super().put(key, body)
            return
        route = self._route(bucket)
        try:
            writer = await self._writer(route)
            await writer.put(key, body)
        except (BotoCoreError, ClientError, OSError) as exc:
            failed = CustomerBucketUnavailable(route, exc)
            since = self._failing_since.setdefault(bucket, self._clock())
            if self._clock() - since >= self._outage_s:
                # Given up on for now: the flush dead-letters this bucket's events at once (every
                # batch tries once more, so the first upload that succeeds ends the outage).
                raise BucketUnavailable(bucket, str(failed)) from exc
            raise failed from exc
        self._failing_since.pop(bucket, None)

    async def get_range(self, bucket: str, key: str, offset: int, length: int) -> bytes:
        if bucket == self.bucket:
            return await super().get_range(bucket, key, offset, length)
        route = self._route(bucket)
        try:
            writer = await self._writer(route)
            return await writer.get_range(bucket, key, offset, length)
        except (BotoCoreError, ClientError, OSError) as exc:
            raise CustomerBucketUnavailable(route, exc) from exc

    def _route(self, bucket: str) -> BucketRoute:
        route = self._by_bucket.get(bucket)
        if route is None:
            raise UnknownBucket(f"no organization_buckets row names bucket {bucket!r}")
        return route

    async def _writer(self, route: BucketRoute) -> _CustomerWriter:
        writer = self._writers.get(route.bucket)
        if writer is not None and writer.reach == route.reach:
            return writer
        async with self._opening:  # concurrent first uploads open one client, not several
            client = self._customer_clients.get(route.reach)
            if client is None:
                client = await self._clients.enter_async_context(customer_client(route))
                self._customer_clients[route.reach] = client
            writer = _CustomerWriter(client, route.bucket, self._multipart_threshold, route.reach)
            self._writers[route.bucket] = writer
            return writer

    async def aclose(self) -> None:
        self._writers.clear()
        self._customer_clients.clear()
        await self._clients.aclose()


class _CustomerWriter(ObjectWriter):
    """A writer for one customer bucket, remembering the reach its client was made for (a route
    changed to another profile or endpoint gets a writer of its own)."""

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        multipart_threshold: int,
        reach: tuple[str, str | None, str | None],
    ) -> None:
        super().__init__(client, bucket, multipart_threshold)
        self.reach = reach


async def keep_refreshed(
    objects: RoutedObjects, connect: Callable[[], AbstractAsyncContextManager[Connection]], every_s: float
) -> None:
    """Reload the routes every `every_s` seconds; a failed reload keeps the last routes (a
    database outage must not send organizations' objects back to the deployment's bucket)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            async with connect() as conn:
                await objects.refresh(conn)
        except Exception as exc:  # noqa: BLE001 - any failure: keep the routes, try again later
            log.warning("customer bucket routes not refreshed: %s: %s", type(exc).__name__, exc)


# ---- the table, for `omnilog buckets` ---------------------------------------------------------


class BucketConflict(Exception):
    """A route that would make a bucket name ambiguous or hand the deployment's bucket away."""


async def set_route(conn: Connection, route: BucketRoute, deployment_bucket: str) -> BucketRoute | None:
    """Make `route` the organization's current bucket; returns the route it replaces (retired,
    kept so that the pointers naming it still read), or None.

    Refused: the deployment's own bucket, and a bucket another row reaches another way (pointers
    name a bucket only, so one name must mean one endpoint and one profile)."""
    if route.bucket == deployment_bucket:
        raise BucketConflict(f"{route.bucket!r} is the deployment's own bucket (OMNILOG_S3_BUCKET)")
    async with conn.transaction():
        await conn.execute("LOCK TABLE organization_buckets IN SHARE ROW EXCLUSIVE MODE")
        others = [r for r in await load_routes(conn) if r.bucket == route.bucket]
        clash = next((r for r in others if r.reach != route.reach), None)
        if clash is not None:
            raise BucketConflict(
                f"bucket {route.bucket!r} is already reached another way: {clash.describe()}"
            )
        previous = await _current_route(conn, route.organization_id)
        if previous is not None and previous.bucket != route.bucket:
            await _retire(conn, route.organization_id)
        await conn.execute(
            """
            INSERT INTO organization_buckets (organization_id, bucket, endpoint_url, region, profile)
            VALUES ($1::uuid, $2, $3, $4, $5)
            ON CONFLICT (organization_id, bucket) DO UPDATE
               SET endpoint_url = EXCLUDED.endpoint_url, region = EXCLUDED.region,
                   profile = EXCLUDED.profile, retired_at = NULL
            """,
            route.organization_id,
            route.bucket,
            route.endpoint_url,
            route.region,
            route.profile,
        )
    return previous if previous is not None and previous.bucket != route.bucket else None


async def retire_route(conn: Connection, organization_id: str) -> BucketRoute | None:
    """The organization's new objects go to the deployment's bucket again; returns the route
    retired (its row stays: pointers still name its bucket), or None when it had none."""
    async with conn.transaction():
        previous = await _current_route(conn, organization_id)
        if previous is not None:
            await _retire(conn, organization_id)
    return previous


async def _current_route(conn: Connection, organization_id: str) -> BucketRoute | None:
    row = await conn.fetchrow(
        "SELECT organization_id::text AS organization_id, bucket, endpoint_url, region, profile, "
        "false AS retired FROM organization_buckets "
        "WHERE organization_id = $1::uuid AND retired_at IS NULL FOR UPDATE",
        organization_id,
    )
    return BucketRoute(**dict(row)) if row is not None else None


async def _retire(conn: Connection, organization_id: str) -> None:
    await conn.execute(
        "UPDATE organization_buckets SET retired_at = now() "
        "WHERE organization_id = $1::uuid AND retired_at IS NULL",
        organization_id,
    )
