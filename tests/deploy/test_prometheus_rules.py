"""The alert and recording rules: promtool accepts them, every alert has a promtool unit test
that makes it fire and one that keeps it quiet, and every alert has a runbook."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.support import DEPLOY, OPERATIONS_DOC, RULE_TESTS, RULES_FILE, load_tool_module, tool


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES_FILE.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in _rules() if "alert" in rule}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, check=False, timeout=120)


def test_promtool_checks_the_plain_rule_file() -> None:
    result = _promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_promtool_checks_the_prometheusrule_groups(tmp_path: Path) -> None:
    rule = yaml.safe_load((DEPLOY / "prometheus" / "prometheusrule.yaml").read_text())
    extracted = tmp_path / "from-prometheusrule.yml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = _promtool("check", "rules", str(extracted))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheusrule_file_is_generated_from_the_rule_file() -> None:
    generator = load_tool_module("gen_prometheusrule")
    expected = generator.render(yaml.safe_load(RULES_FILE.read_text()))
    assert (DEPLOY / "prometheus" / "prometheusrule.yaml").read_text() == expected, (
        "stale: run python deploy/tools/gen_prometheusrule.py"
    )


def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, "no rule unit tests found"
    result = _promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


def test_unit_tests_fix_the_group_evaluation_order() -> None:
    # promtool evaluates groups in random (Go map) order unless a test file says otherwise; an
    # alert that reads a recording rule then sees this step's or the previous step's value by
    # chance, and its expected annotations flake. Recording groups must come first.
    groups = [group["name"] for group in yaml.safe_load(RULES_FILE.read_text())["groups"]]
    for path in RULE_TESTS:
        order = yaml.safe_load(path.read_text()).get("group_eval_order")
        assert order == groups, f"{path.name}: group_eval_order must list {groups}"
    assert groups.index("omnilog.recording") < groups.index("omnilog.alerts")


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../rules/omnilog.rules.yml"], (
            f"{path.name} must test the real rule file"
        )
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    alerts = set(_alerts())
    assert alerts - fires == set(), "alerts never shown to fire"
    assert alerts - quiet == set(), "alerts never shown to stay quiet"
    assert (fires | quiet) - alerts == set(), "tests for alerts that do not exist"


def test_every_recording_rule_has_a_unit_test() -> None:
    tested = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("promql_expr_test", []):
                tested.update(re.findall(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", check["expr"]))
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    assert recorded - tested == set()


def test_every_alert_has_severity_annotations_and_a_runbook_section() -> None:
    doc = OPERATIONS_DOC.read_text()
    # GitHub's anchors: lower-cased heading text, spaces to dashes, punctuation dropped.
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", m.group(1).strip().lower()).replace(" ", "-")
        for m in re.finditer(r"^#+ (.+)$", doc, re.MULTILINE)
    }
    for name, rule in _alerts().items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description", "runbook_url"} <= rule["annotations"].keys(), name
        url = rule["annotations"]["runbook_url"]
        assert url.endswith(f"docs/operations.md#{name.lower()}"), name
        assert name.lower() in anchors, f"docs/operations.md has no runbook heading for {name}"
