"""Validating custom resources against the upstream CRDs in tests/deploy/data/crds, strictly.

kubernetes-validate knows only Kubernetes' own kinds. For a CRD's kind, the API server checks
the object against the CRD's `openAPIV3Schema` and prunes (or, with strict field validation,
refuses) fields the schema does not declare; here every object schema that declares its
properties is closed, so that a misspelt field fails instead of silently vanishing. CEL rules
(`x-kubernetes-validations`) are left to the tests.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRDS = Path(__file__).parent / "data" / "crds"


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with `additionalProperties: false` wherever it lists properties and no more."""
    schema = copy.deepcopy(schema)
    _close(schema)
    return schema


def _close(node: dict[str, Any]) -> None:
    open_ended = "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in node and not open_ended:
        node["additionalProperties"] = False
    for child in node.get("properties", {}).values():
        _close(child)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _close(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        for child in node.get(key, []):
            _close(child)


@dataclass(frozen=True)
class CustomResourceSchema:
    """One version of one CRD's kind, with a strict validator of its objects."""

    api_version: str
    kind: str
    validator: jsonschema.protocols.Validator

    @classmethod
    def load(cls, filename: str, version: str) -> CustomResourceSchema:
        """The schema of `version` in the CRD file `filename` under data/crds."""
        crd = yaml.safe_load((CRDS / filename).read_text())
        spec = crd["spec"]
        served = next(v for v in spec["versions"] if v["name"] == version)
        schema = strict(served["schema"]["openAPIV3Schema"])
        validator = jsonschema.Draft4Validator(schema)  # OpenAPI 3.0's schemas are draft 4's
        return cls(f"{spec['group']}/{version}", spec["names"]["kind"], validator)

    def errors(self, obj: Mapping[str, Any]) -> list[str]:
        """One line per problem of `obj` (empty when it is a valid object of this kind)."""
        problems = []
        if (obj.get("apiVersion"), obj.get("kind")) != (self.api_version, self.kind):
            problems.append(f"not a {self.api_version} {self.kind}")
        for error in sorted(self.validator.iter_errors(obj), key=lambda e: list(e.path)):
            path = ".".join(str(p) for p in error.absolute_path)
            problems.append(f"{path}: {error.message}")
        return problems
