"""The bucket's lifecycle configuration, computed from the organizations table, so storage
expires even if `omnilog maintain` stops.

One rule per organization prefix `org/<id>/` whose retention is shorter than the longest, and
one catch-all rule on `org/` at the longest retention (it also covers organizations that events
name but nobody registered). Where rules overlap S3 applies the shortest expiration, so the
catch-all never expires an organization's objects early; it keeps the rule count at "the
organizations with a shorter retention + 1", within S3's 1,000 rules per bucket.

Expiration lags retention by `EXPIRY_MARGIN_DAYS`: `maintain` (hourly) deletes an organization's
index rows and objects at its retention; the lifecycle is the safety net behind it, and must not
delete an object whose index rows a healthy `maintain` has not removed yet. S3 counts days from
the object's creation, which is never before its events' day, so an object never expires
before its day's retention.

Storage classes per plan: enterprise objects move to STANDARD_IA after 30 days and to GLACIER
after 90; S3 refuses a transition to STANDARD_IA before 30 days, so the seed's "pro: IA after
7 days" is not expressible and pro objects (30 days) stay in STANDARD; a transition is kept only
when the object would stay in the new class at least 30 days before it expires (the classes'
minimum billed duration).

Customer-owned buckets (docs/storage.md) get no rule from us: the customer's own lifecycle rules
govern them. The organization's rule on the deployment's bucket stays: it expires the objects
written there before the organization had a bucket of its own. `customer_bucket_notes` says so
next to the plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import botocore.session
from botocore.model import ListShape, Shape, StringShape, StructureShape
from botocore.validate import ParamValidator

from sinks.buckets import BucketRoute
from sinks.retention import OrganizationRetention

EXPIRY_MARGIN_DAYS = 2
MAX_RULES = 1000  # S3's limit per bucket lifecycle configuration
MIN_DAYS_IN_CLASS = 30
# (days after creation, storage class) per plan; organizations without a plan follow free's.
PLAN_TRANSITIONS: dict[str, tuple[tuple[int, str], ...]] = {
    "free": (),
    "pro": ((30, "STANDARD_IA"),),
    "enterprise": ((30, "STANDARD_IA"), (90, "GLACIER")),
}
CATCH_ALL_ID = "omnilog-org-default"


class LifecycleError(Exception):
    """The configuration cannot be expressed (too many rules) or is invalid for the S3 API."""


def _transitions(plan: str | None, expire_after: int, enabled: bool = True) -> list[dict[str, Any]]:
    steps = PLAN_TRANSITIONS.get(plan or "free", ()) if enabled else ()
    return [
        {"Days": days, "StorageClass": storage_class}
        for days, storage_class in steps
        if days + MIN_DAYS_IN_CLASS <= expire_after
    ]


def _rule(rule_id: str, prefix: str, expire_after: int, transitions: list[dict[str, Any]]) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "ID": rule_id,
        "Filter": {"Prefix": prefix},
        "Status": "Enabled",
        "Expiration": {"Days": expire_after},
        # Leftovers of interrupted multipart uploads are never referenced by anything.
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
    }
    if transitions:
        rule["Transitions"] = transitions
    return rule


def plan_configuration(
    organizations: Sequence[OrganizationRetention],
    fallback_days: int,
    *,
    transitions: bool = True,
) -> dict[str, Any]:
    """The LifecycleConfiguration for `organizations`; `fallback_days` is the retention of
    organizations nobody registered (and the catch-all's floor). Raises LifecycleError past S3's
    rule limit, or when botocore's model rejects the configuration. `transitions=False` leaves
    out the storage-class transitions (for stores that implement only expiry, e.g. SeaweedFS)."""
    longest = max([fallback_days, *(o.days for o in organizations)])
    rules = [
        _rule(f"omnilog-org-{o.organization_id}", f"org/{o.organization_id}/", o.days + EXPIRY_MARGIN_DAYS,
              _transitions(o.plan, o.days + EXPIRY_MARGIN_DAYS, transitions))
        for o in sorted(organizations, key=lambda o: o.organization_id)
        if o.days < longest
    ]  # fmt: skip
    # The catch-all takes the transitions of the plan that needs the longest retention.
    longest_plan = next((o.plan for o in organizations if o.days == longest), "enterprise")
    rules.append(
        _rule(
            CATCH_ALL_ID,
            "org/",
            longest + EXPIRY_MARGIN_DAYS,
            _transitions(longest_plan, longest + EXPIRY_MARGIN_DAYS, transitions),
        )
    )
    if len(rules) > MAX_RULES:
        raise LifecycleError(
            f"{len(rules)} lifecycle rules needed (organizations with a retention shorter than the "
            f"longest, plus one), S3 accepts {MAX_RULES}: `maintain` still applies every retention"
        )
    configuration = {"Rules": rules}
    validate(configuration)
    return configuration


def validate(configuration: dict[str, Any]) -> None:
    """Check the configuration against botocore's model of PutBucketLifecycleConfiguration (the
    S3 API's own shapes), for what a test server does not implement (storage classes)."""
    model = botocore.session.get_session().get_service_model("s3")
    shape = model.operation_model("PutBucketLifecycleConfiguration").input_shape
    assert shape is not None  # the operation takes input
    report = ParamValidator().validate({"Bucket": "omnilog", "LifecycleConfiguration": configuration}, shape)
    if report.has_errors():
        raise LifecycleError(f"invalid lifecycle configuration: {report.generate_report()}")
    # ParamValidator checks types and required members, not enums: a misspelt StorageClass passes it.
    errors = _enum_errors(configuration, shape.members["LifecycleConfiguration"], "LifecycleConfiguration")
    if errors:
        raise LifecycleError(f"invalid lifecycle configuration: {'; '.join(errors)}")


def _enum_errors(value: Any, shape: Shape, path: str) -> list[str]:
    """The enum violations in `value` against `shape`, with their paths (ParamValidator skips them)."""
    if isinstance(shape, StructureShape) and isinstance(value, dict):
        known = [(k, v) for k, v in value.items() if k in shape.members]
        return [e for k, v in known for e in _enum_errors(v, shape.members[k], f"{path}.{k}")]
    if isinstance(shape, ListShape) and isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _enum_errors(v, shape.member, f"{path}[{i}]")]
    if isinstance(shape, StringShape) and shape.enum and value not in shape.enum:
        return [f"{path}: {value!r} is not one of {shape.enum}"]
    return []


def customer_bucket_notes(routes: Sequence[BucketRoute]) -> list[str]:
    """One line per current customer bucket, to print beside the plan: its organization's new
    objects are not in the bucket these rules govern."""
    return [
        f"{r.describe()}: not governed by these rules (the customer's own lifecycle rules apply); "
        f"the rule for org/{r.organization_id}/ covers its objects written here before"
        for r in routes
        if not r.retired
    ]
