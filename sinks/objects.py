"""Object storage (S3): the client, uploads (one PUT, or multipart for large objects) and ranged
reads of one gzip member. What an object holds and how it is named is the core's
(`pipeline.processing.layout`, docs/contract.md §3-4)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import aioboto3
from aiobotocore.config import AioConfig

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from types_aiobotocore_s3 import S3Client

    from pipeline.settings import Settings

_MULTIPART_PART_BYTES = 8 * 1024 * 1024  # S3 needs >= 5 MiB parts except the last


def s3_client(settings: Settings) -> AbstractAsyncContextManager[S3Client]:
    """An S3 client for the configured endpoint (empty endpoint: AWS) and credentials."""
    key = settings.aws_access_key_id
    secret = settings.aws_secret_access_key
    return aioboto3.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url or None,
        region_name=settings.aws_region,
        aws_access_key_id=key.get_secret_value() if key else None,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        config=AioConfig(
            # Self-hosted S3 (SeaweedFS, MinIO) wants path-style addressing; AWS prefers virtual hosts.
            s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=32,
            connect_timeout=5,
            read_timeout=30,
        ),
    )


class ObjectWriter:
    """Uploads encoded objects; large ones by multipart upload. Retries are the caller's policy."""

    def __init__(self, client: S3Client, bucket: str, multipart_threshold: int, concurrency: int = 8) -> None:
        self._client = client
        self._bucket = bucket
        self._multipart_threshold = multipart_threshold
        self._slots = asyncio.Semaphore(concurrency)

    @property
    def bucket(self) -> str:
        return self._bucket

    def bucket_for(self, organization_id: str) -> str:
        return self._bucket

    async def put(self, key: str, body: bytes, *, bucket: str | None = None) -> None:
        if bucket is not None and bucket != self._bucket:
            raise ValueError(f"this writer stores into {self._bucket!r} only, not {bucket!r}")
        async with self._slots:
            if len(body) >= self._multipart_threshold:
                await self._put_multipart(key, body)
            else:
                await self._client.put_object(
                    Bucket=self._bucket,
                    Key=key,
                    Body=body,
                    ContentType="application/x-ndjson",
                    ContentEncoding="gzip",
                )

    async def put_blob(self, key: str, body: bytes) -> None:
        """Store opaque bytes as they are (a dead letter's value): one PUT, no content encoding."""
        async with self._slots:
            await self._client.put_object(
                Bucket=self._bucket, Key=key, Body=body, ContentType="application/octet-stream"
            )

    async def _put_multipart(self, key: str, body: bytes) -> None:
        created = await self._client.create_multipart_upload(
            Bucket=self._bucket, Key=key, ContentType="application/x-ndjson", ContentEncoding="gzip"
        )
        upload_id = created["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            for number, start in enumerate(range(0, len(body), _MULTIPART_PART_BYTES), start=1):
                part = await self._client.upload_part(
                    Bucket=self._bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body[start : start + _MULTIPART_PART_BYTES],
                )
                parts.append({"ETag": part["ETag"], "PartNumber": number})
            await self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
            )
        except BaseException:
            # An abandoned multipart upload bills storage until aborted; abort is best effort.
            with contextlib.suppress(Exception):  # the original error is the one worth raising
                await asyncio.shield(
                    self._client.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload_id)
                )
            raise

    async def get_range(self, bucket: str, key: str, offset: int, length: int) -> bytes:
        response = await self._client.get_object(
            Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}"
        )
        async with response["Body"] as stream:
            data: bytes = await stream.read()
        return data
