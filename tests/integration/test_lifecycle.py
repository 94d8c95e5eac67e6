"""`omnilog lifecycle plan|apply` against the organizations table and SeaweedFS."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import botocore.session
import orjson
import pytest
from botocore.model import ListShape, Shape, StringShape, StructureShape
from botocore.validate import ParamValidator
from click.testing import CliRunner, Result

from pipeline.cli import cli
from pipeline.settings import Settings
from sinks.lifecycle import CATCH_ALL_ID
from sinks.migrate import migrate
from tests.integration.cli_env import command_env

pytestmark = pytest.mark.integration
FREE = "00000000-0000-0000-0000-0000000000a1"


async def _lifecycle(settings: Settings, *args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, cli, ["lifecycle", *args], env=command_env(settings))


async def test_plan_and_apply_follow_the_organizations_table(
    fresh_database_url: str, make_settings: Callable[..., Settings]
) -> None:
    await migrate(fresh_database_url)
    settings = make_settings(database_url=fresh_database_url)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await conn.execute(
            "INSERT INTO organizations (id, name, slug, plan_type) VALUES ($1::uuid, 'f', 'f', 'free')", FREE
        )
    finally:
        await conn.close()
    planned = await _lifecycle(settings, "plan")
    assert planned.exit_code == 0, planned.output
    rules = {r["ID"]: r for r in orjson.loads(planned.output)["Rules"]}
    assert rules[f"omnilog-org-{FREE}"]["Expiration"] == {"Days": 9}
    assert rules[CATCH_ALL_ID]["Expiration"] == {"Days": 367}  # the default organization's 365 days

    # SeaweedFS implements expiry, not storage classes: with transitions it answers NotImplemented
    # (the gap stated in docs/operations.md; the transitions are checked against botocore's model).
    refused = await _lifecycle(settings, "apply")
    assert refused.exit_code == 1 and "NotImplemented" in refused.output, refused.output

    planned_bare = await _lifecycle(settings, "plan", "--without-transitions")
    applied = await _lifecycle(settings, "apply", "--without-transitions")
    assert applied.exit_code == 0, applied.output
    # What the bucket reports back is exactly the plan.
    assert orjson.loads(applied.output) == orjson.loads(planned_bare.output)

    # A plan change takes effect at the next apply: free -> pro.
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await conn.execute("UPDATE organizations SET plan_type = 'pro' WHERE id = $1::uuid", FREE)
    finally:
        await conn.close()
    again = await _lifecycle(settings, "apply", "--without-transitions")
    assert again.exit_code == 0, again.output
    rules = {r["ID"]: r for r in orjson.loads(again.output)["Rules"]}
    assert rules[f"omnilog-org-{FREE}"]["Expiration"] == {"Days": 32}
    assert rules[f"omnilog-org-{FREE}"]["Filter"] == {"Prefix": f"org/{FREE}/"}


# --- The plan against the S3 API model ------------------------------------------------------------
# SeaweedFS refuses transitions (NotImplemented), so no server here checks them: the plan printed
# for every plan type is checked against botocore's model of PutBucketLifecycleConfiguration.
# botocore's ParamValidator checks types and required members but not enums (a misspelt
# StorageClass or Status passes it), so the model's enums are walked here as well.
_S3 = botocore.session.get_session().get_service_model("s3")
_INPUT = _S3.operation_model("PutBucketLifecycleConfiguration").input_shape
PLAN_ORGS = {
    "00000000-0000-0000-0000-0000000000b1": ("free", None),
    "00000000-0000-0000-0000-0000000000b2": ("pro", None),
    "00000000-0000-0000-0000-0000000000b3": ("enterprise", None),
    "00000000-0000-0000-0000-0000000000b4": ("enterprise", 120),  # explicit, shorter than the longest
    "00000000-0000-0000-0000-0000000000b5": ("pro", 400),  # explicit, the longest: the catch-all's
}


def _enum_errors(value: Any, shape: Shape, path: str) -> list[str]:
    """Values outside the model's enums, anywhere in `value` (a request of `shape`)."""
    if isinstance(shape, StructureShape) and isinstance(value, dict):
        return [
            e
            for key, member in value.items()
            if key in shape.members
            for e in _enum_errors(member, shape.members[key], f"{path}.{key}")
        ]
    if isinstance(shape, ListShape) and isinstance(value, list):
        return [e for i, item in enumerate(value) for e in _enum_errors(item, shape.member, f"{path}[{i}]")]
    if isinstance(shape, StringShape) and shape.enum and value not in shape.enum:
        return [f"{path}: {value!r} is not one of {shape.enum}"]
    return []


def _model_errors(configuration: dict[str, Any]) -> list[str]:
    assert _INPUT is not None
    request = {"Bucket": "omnilog", "LifecycleConfiguration": configuration}
    report = ParamValidator().validate(request, _INPUT)
    errors = [report.generate_report()] if report.has_errors() else []
    return errors + _enum_errors(request, _INPUT, "request")


def test_the_model_check_rejects_a_misspelt_storage_class_and_status() -> None:
    rule = {
        "ID": "x", "Filter": {"Prefix": "org/"}, "Status": "Enabled", "Expiration": {"Days": 90},
        "Transitions": [{"Days": 30, "StorageClass": "STANDARD_IA"}],
    }  # fmt: skip
    assert _model_errors({"Rules": [rule]}) == []
    misspelt = {**rule, "Status": "enabled", "Transitions": [{"Days": 30, "StorageClass": "GLACIERR"}]}
    assert len(_model_errors({"Rules": [misspelt]})) == 2
    assert _model_errors({"Rules": [{**rule, "Expiration": {"Days": "90"}}]}) != []


async def test_the_plan_of_every_plan_type_is_valid_for_the_s3_api(
    fresh_database_url: str, make_settings: Callable[..., Settings]
) -> None:
    await migrate(fresh_database_url)
    settings = make_settings(database_url=fresh_database_url)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        for org, (plan, days) in PLAN_ORGS.items():
            await conn.execute(
                "INSERT INTO organizations (id, name, slug, plan_type, log_retention_days)"
                " VALUES ($1::uuid, $2::text, $2::text, $3::plan_type_enum, $4)",
                org, f"o-{org[-2:]}", plan, days,
            )  # fmt: skip
    finally:
        await conn.close()
    for args in ((), ("--without-transitions",)):
        planned = await _lifecycle(settings, "plan", *args)
        assert planned.exit_code == 0, planned.output
        configuration = orjson.loads(planned.output)
        assert _model_errors(configuration) == []
        classes = {t["StorageClass"] for r in configuration["Rules"] for t in r.get("Transitions", [])}
        # With transitions: enterprise rules to IA and GLACIER, the catch-all (pro, 400 d) to IA.
        assert classes == (set() if args else {"STANDARD_IA", "GLACIER"})
        rules = {r["ID"] for r in configuration["Rules"]}
        longest = "00000000-0000-0000-0000-0000000000b5"  # its retention is the catch-all's
        assert rules >= {f"omnilog-org-{o}" for o in PLAN_ORGS if o != longest} | {CATCH_ALL_ID}
        assert f"omnilog-org-{longest}" not in rules
