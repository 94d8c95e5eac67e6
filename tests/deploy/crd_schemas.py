"""Structural JSON Schemas for the custom resources in the manifests.

The Kubernetes schemas shipped with kubernetes-validate cover built-in kinds only, and the
operators' CRD schemas are not available offline. These schemas cover exactly the fields the
manifests use, with the types and enums of the upstream CRDs (prometheus-operator
monitoring.coreos.com/v1, KEDA keda.sh/v1alpha1), and reject unknown fields at every level we
populate, so a misspelt field fails here instead of being pruned silently by the API server.
"""

from __future__ import annotations

from typing import Any

_DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": _LABELS,
        "annotations": _LABELS,
    },
    "additionalProperties": False,
}
_MATCH_LABELS = {
    "type": "object",
    "properties": {"matchLabels": _LABELS},
    "additionalProperties": False,
}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


SERVICE_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    {
        "type": "object",
        "required": ["selector", "endpoints"],
        "properties": {
            "selector": _MATCH_LABELS,
            "jobLabel": {"type": "string"},
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string", "pattern": "^/"},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                        "scheme": {"enum": ["http", "https"]},
                        "honorLabels": {"type": "boolean"},
                    },
                    "required": ["port"],
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    },
)

_RULE = {
    "type": "object",
    "properties": {
        "record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9]*$"},
        "expr": {"type": "string", "minLength": 1},
        "for": _DURATION,
        "labels": _LABELS,
        "annotations": _LABELS,
    },
    "required": ["expr"],
    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
    "additionalProperties": False,
}

PROMETHEUS_RULE = _resource(
    "monitoring.coreos.com/v1",
    "PrometheusRule",
    {
        "type": "object",
        "required": ["groups"],
        "properties": {
            "groups": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["name", "rules"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": _DURATION,
                        "rules": {"type": "array", "minItems": 1, "items": _RULE},
                    },
                    "additionalProperties": False,
                },
            }
        },
        "additionalProperties": False,
    },
)

_INT_STRING = {"type": "string", "pattern": "^[0-9]+$"}
_BOOL_STRING = {"enum": ["true", "false"]}
_HPA_POLICY = {
    "type": "object",
    "required": ["type", "value", "periodSeconds"],
    "properties": {
        "type": {"enum": ["Pods", "Percent"]},
        "value": {"type": "integer", "minimum": 1},
        "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
    },
    "additionalProperties": False,
}
_HPA_RULES = {
    "type": "object",
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {"type": "array", "items": _HPA_POLICY},
    },
    "additionalProperties": False,
}

SCALED_OBJECT = _resource(
    "keda.sh/v1alpha1",
    "ScaledObject",
    {
        "type": "object",
        "required": ["scaleTargetRef", "triggers"],
        "properties": {
            "scaleTargetRef": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "kind": {"type": "string"},
                    "apiVersion": {"type": "string"},
                },
                "additionalProperties": False,
            },
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "advanced": {
                "type": "object",
                "properties": {
                    "horizontalPodAutoscalerConfig": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "behavior": {
                                "type": "object",
                                "properties": {"scaleUp": _HPA_RULES, "scaleDown": _HPA_RULES},
                                "additionalProperties": False,
                            },
                        },
                        "additionalProperties": False,
                    },
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                },
                "additionalProperties": False,
            },
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["type", "metadata"],
                    "properties": {
                        "type": {"const": "kafka"},
                        "name": {"type": "string"},
                        "authenticationRef": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {"name": {"type": "string"}},
                        },
                        # The Kafka scaler's parameters (KEDA docs, "Apache Kafka" scaler):
                        # all values are strings.
                        "metadata": {
                            "type": "object",
                            "properties": {
                                "bootstrapServers": {"type": "string"},
                                "bootstrapServersFromEnv": {"type": "string"},
                                "consumerGroup": {"type": "string"},
                                "consumerGroupFromEnv": {"type": "string"},
                                "topic": {"type": "string"},
                                "topicFromEnv": {"type": "string"},
                                "lagThreshold": _INT_STRING,
                                "activationLagThreshold": _INT_STRING,
                                "offsetResetPolicy": {"enum": ["earliest", "latest"]},
                                "allowIdleConsumers": _BOOL_STRING,
                                "scaleToZeroOnInvalidOffset": _BOOL_STRING,
                                "excludePersistentLag": _BOOL_STRING,
                                "limitToPartitionsWithLag": _BOOL_STRING,
                                "version": {"type": "string"},
                            },
                            "anyOf": [
                                {"required": ["bootstrapServers"]},
                                {"required": ["bootstrapServersFromEnv"]},
                            ],
                            "additionalProperties": False,
                        },
                    },
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    },
)

BY_KIND: dict[str, dict[str, Any]] = {
    "ServiceMonitor": SERVICE_MONITOR,
    "PrometheusRule": PROMETHEUS_RULE,
    "ScaledObject": SCALED_OBJECT,
}
