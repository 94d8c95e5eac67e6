"""The lifecycle configuration computed per plan and retention, checked against botocore's model
of the S3 API (what SeaweedFS does not implement, storage classes, is covered only here)."""

from __future__ import annotations

import pytest

from sinks.lifecycle import CATCH_ALL_ID, MAX_RULES, LifecycleError, plan_configuration, validate
from sinks.retention import OrganizationRetention

FREE, PRO, ENTERPRISE, CUSTOM = "f", "p", "e", "c"


def _org(org: str, days: int, plan: str | None) -> OrganizationRetention:
    return OrganizationRetention(org, days, False, plan)


def test_each_plan_gets_its_expiry_and_transitions_and_the_longest_is_the_catch_all() -> None:
    config = plan_configuration(
        [
            _org(FREE, 7, "free"),
            _org(PRO, 30, "pro"),
            _org(ENTERPRISE, 365, "enterprise"),
            _org(CUSTOM, 200, "enterprise"),
        ],
        fallback_days=90,
    )
    rules = {r["ID"]: r for r in config["Rules"]}
    assert set(rules) == {f"omnilog-org-{o}" for o in (FREE, PRO, CUSTOM)} | {CATCH_ALL_ID}
    free, pro, custom = (rules[f"omnilog-org-{o}"] for o in (FREE, PRO, CUSTOM))
    rest = rules[CATCH_ALL_ID]
    assert free["Filter"] == {"Prefix": "org/f/"} and free["Expiration"] == {"Days": 9}
    assert "Transitions" not in free
    # Pro: S3 refuses STANDARD_IA before 30 days, and 30 + 30 days in IA is past its 32-day expiry.
    assert pro["Expiration"] == {"Days": 32} and "Transitions" not in pro
    assert custom["Expiration"] == {"Days": 202}
    assert custom["Transitions"] == [
        {"Days": 30, "StorageClass": "STANDARD_IA"},
        {"Days": 90, "StorageClass": "GLACIER"},
    ]
    # The 365-day organization needs no rule of its own: the catch-all on org/ is its retention.
    assert rest["Filter"] == {"Prefix": "org/"} and rest["Expiration"] == {"Days": 367}
    assert [t["StorageClass"] for t in rest["Transitions"]] == ["STANDARD_IA", "GLACIER"]
    assert all(r["Status"] == "Enabled" for r in config["Rules"])


def test_unregistered_organizations_floor_the_catch_all() -> None:
    config = plan_configuration([_org(FREE, 7, "free")], fallback_days=90)
    assert config["Rules"][-1]["Expiration"] == {"Days": 92}


def test_more_rules_than_s3_accepts_are_refused() -> None:
    orgs = [_org(f"o{n}", 7, "free") for n in range(MAX_RULES)] + [_org("long", 365, "enterprise")]
    with pytest.raises(LifecycleError, match="1001 lifecycle rules"):
        plan_configuration(orgs, fallback_days=90)


def test_the_s3_model_rejects_a_malformed_rule() -> None:
    with pytest.raises(LifecycleError, match="Status"):
        validate({"Rules": [{"ID": "x", "Filter": {"Prefix": "org/"}, "Expiration": {"Days": 3}}]})
    with pytest.raises(LifecycleError, match="Days"):
        validate({"Rules": [{"ID": "x", "Status": "Enabled", "Expiration": {"Days": "soon"}}]})
