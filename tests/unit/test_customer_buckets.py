"""RoutedObjects' routing without a network: which bucket an organization's objects go to, which
route a pointer's bucket reads through, and how a customer bucket's failures are classified."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError

from pipeline.processing.retry import ErrorKind, classify
from sinks.buckets import BucketRoute, CustomerBucketUnavailable, RoutedObjects, UnknownBucket
from sinks.lifecycle import customer_bucket_notes

ORG_A, ORG_B, ORG_C = "a" * 8, "b" * 8, "c" * 8


class _Recorder:
    """The deployment's client: records what it is asked to store."""

    def __init__(self) -> None:
        self.puts: list[tuple[str, str]] = []

    async def put_object(self, **kwargs: Any) -> None:
        self.puts.append((kwargs["Bucket"], kwargs["Key"]))


def _objects() -> tuple[RoutedObjects, _Recorder]:
    client = _Recorder()
    return RoutedObjects(client, "ours", 1 << 30), client  # type: ignore[arg-type]


def test_organizations_without_a_current_route_write_to_the_deployment_bucket() -> None:
    objects, _ = _objects()
    objects.use_routes(
        [
            BucketRoute(ORG_A, "acme-old", None, None, "acme", retired=True),
            BucketRoute(ORG_A, "acme-new", None, None, "acme"),
            BucketRoute(ORG_B, "bee", "http://s3.bee.example", "eu-west-1", "bee", retired=True),
        ]
    )
    assert objects.bucket_for(ORG_A) == "acme-new"
    assert objects.bucket_for(ORG_B) == "ours"  # its bucket is retired: back to ours
    assert objects.bucket_for(ORG_C) == "ours"
    # Retired routes stay known: old pointers still read.
    assert {r.bucket for r in objects.routes()} == {"acme-old", "acme-new", "bee"}


def test_a_refresh_replaces_the_routes_and_a_route_to_our_bucket_is_ignored() -> None:
    objects, _ = _objects()
    objects.use_routes([BucketRoute(ORG_A, "acme", None, None, "acme")])
    objects.use_routes([BucketRoute(ORG_B, "ours", None, None, "stolen")])
    assert objects.bucket_for(ORG_A) == "ours"
    assert objects.bucket_for(ORG_B) == "ours"
    assert objects.routes() == []


async def test_the_deployment_bucket_goes_through_the_default_client() -> None:
    objects, client = _objects()
    await objects.put("org/x/1", b"1")
    await objects.put("org/x/2", b"2", bucket="ours")
    assert client.puts == [("ours", "org/x/1"), ("ours", "org/x/2")]


async def test_a_bucket_no_route_names_is_refused_not_written_with_our_keys() -> None:
    objects, client = _objects()
    with pytest.raises(UnknownBucket):
        await objects.get_range("elsewhere", "org/x/1", 0, 10)
    with pytest.raises(UnknownBucket):
        await objects.put("org/x/1", b"1", bucket="elsewhere")
    assert client.puts == []


async def test_an_unknown_profile_is_an_outage_of_that_bucket_naming_organization_and_profile() -> None:
    objects, _ = _objects()
    objects.use_routes([BucketRoute(ORG_A, "acme", None, "us-east-1", "no-such-profile-h6")])
    with pytest.raises(CustomerBucketUnavailable) as failed:
        await objects.put("org/a/1", b"1", bucket="acme")
    assert ORG_A in str(failed.value) and "no-such-profile-h6" in str(failed.value)
    assert classify(failed.value) is ErrorKind.RETRIABLE


def test_a_customer_bucket_failure_is_retriable_whatever_its_cause() -> None:
    route = BucketRoute(ORG_A, "acme", None, None, "acme")
    for cause in (PermissionError("denied"), EndpointConnectionError(endpoint_url="http://x")):
        assert classify(CustomerBucketUnavailable(route, cause)) is ErrorKind.RETRIABLE


def test_lifecycle_notes_name_current_customer_buckets_only() -> None:
    notes = customer_bucket_notes(
        [
            BucketRoute(ORG_A, "acme", None, None, "acme"),
            BucketRoute(ORG_B, "bee", None, None, "bee", retired=True),
        ]
    )
    assert len(notes) == 1 and "'acme'" in notes[0] and f"org/{ORG_A}/" in notes[0]
