"""Strict schemas for the custom resources the chart renders.

kubernetes-validate knows only built-in kinds, so the chart's cert-manager and
prometheus-operator objects are checked here, against the fields of their v1
CRDs (cert-manager.io/v1, monitoring.coreos.com/v1) that this chart can set.
Unknown fields are rejected, as ``--strict`` does for built-in kinds.
"""

from __future__ import annotations

from typing import Any


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": props,
        "required": list(required),
    }


STR = {"type": "string", "minLength": 1}
STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
META = _obj(
    {"name": STR, "namespace": STR, "labels": STRMAP, "annotations": STRMAP}, ("name", "namespace")
)
LABEL_SELECTOR = _obj(
    {
        "matchLabels": STRMAP,
        "matchExpressions": {
            "type": "array",
            "items": _obj(
                {
                    "key": STR,
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
                ("key", "operator"),
            ),
        },
    }
)
NAMESPACE_SELECTOR = _obj(
    {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": STR}}
)
SECRET_KEY = _obj({"name": STR, "key": STR, "optional": {"type": "boolean"}}, ("key",))


def _kind(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _obj(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": META,
            "spec": spec,
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )


SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("cert-manager.io/v1", "Issuer"): _kind(
        "cert-manager.io/v1",
        "Issuer",
        _obj(
            {
                "selfSigned": _obj({"crlDistributionPoints": {"type": "array"}}),
                "ca": _obj({"secretName": STR}, ("secretName",)),
            }
        ),
    ),
    ("cert-manager.io/v1", "Certificate"): _kind(
        "cert-manager.io/v1",
        "Certificate",
        _obj(
            {
                "secretName": STR,
                "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": {"type": "array", "items": STR, "minItems": 1},
                "duration": DURATION,
                "renewBefore": DURATION,
                "isCA": {"type": "boolean"},
                "privateKey": _obj(
                    {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    }
                ),
                "usages": {
                    "type": "array",
                    "items": {
                        "enum": [
                            "signing",
                            "digital signature",
                            "content commitment",
                            "key encipherment",
                            "key agreement",
                            "data encipherment",
                            "cert sign",
                            "crl sign",
                            "encipher only",
                            "decipher only",
                            "any",
                            "server auth",
                            "client auth",
                            "code signing",
                            "email protection",
                            "s/mime",
                            "ipsec end system",
                            "ipsec tunnel",
                            "ipsec user",
                            "timestamping",
                            "ocsp signing",
                            "microsoft sgc",
                            "netscape sgc",
                        ]
                    },
                },
                "issuerRef": _obj(
                    {
                        "name": STR,
                        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                        "group": {"type": "string"},
                    },
                    ("name",),
                ),
            },
            ("secretName", "issuerRef"),
        ),
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _kind(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        _obj(
            {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": NAMESPACE_SELECTOR,
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _obj(
                        {
                            "port": STR,
                            "path": STR,
                            "scheme": {"enum": ["http", "https"]},
                            "interval": DURATION,
                            "tlsConfig": _obj(
                                {
                                    "serverName": STR,
                                    "insecureSkipVerify": {"type": "boolean"},
                                    "ca": _obj({"secret": SECRET_KEY, "configMap": SECRET_KEY}),
                                }
                            ),
                        }
                    ),
                },
            },
            ("selector", "endpoints"),
        ),
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): _kind(
        "monitoring.coreos.com/v1",
        "PodMonitor",
        _obj(
            {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": NAMESPACE_SELECTOR,
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _obj(
                        {
                            "port": STR,
                            "path": STR,
                            "scheme": {"enum": ["http", "https"]},
                            "interval": DURATION,
                        }
                    ),
                },
            },
            ("selector", "podMetricsEndpoints"),
        ),
    ),
}
