"""Writes deploy/prometheus/prometheusrule.yaml from the plain rule file.

The plain file (deploy/prometheus/rules/omnilog.rules.yml) is what `promtool` checks and tests and
what Prometheus without the operator loads; the PrometheusRule carries the same groups for the
prometheus-operator. Run after editing the rules: `python deploy/tools/gen_prometheusrule.py`
(`--check` exits 1 when the committed file is stale; tests/deploy runs the same comparison).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
RULES = DEPLOY / "prometheus" / "rules" / "omnilog.rules.yml"
OUTPUT = DEPLOY / "prometheus" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from rules/omnilog.rules.yml by deploy/tools/gen_prometheusrule.py: do not edit.
# Selected by the prometheus-operator's ruleSelector: with kube-prometheus-stack, add the label
# your release selects (e.g. `release: kube-prometheus-stack`) in an overlay.
"""


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (long PromQL) as `|` blocks, as a person would write them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def render(rules: dict[str, Any]) -> str:
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "omnilog",
            "labels": {"app.kubernetes.io/name": "omnilog", "app.kubernetes.io/component": "ingest"},
        },
        "spec": {"groups": rules["groups"]},
    }
    body = yaml.dump(resource, Dumper=_BlockDumper, sort_keys=False, width=10_000, allow_unicode=True)
    return HEADER + body


def main(argv: list[str]) -> int:
    text = render(yaml.safe_load(RULES.read_text()))
    if "--check" in argv:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python {Path(__file__).relative_to(DEPLOY.parent)}")
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
