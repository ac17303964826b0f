"""The CRDs in ../shared/crds (KServe, KubeRay, Kubeflow training operator) as strict JSON Schema
validators: objects are checked the way ``kubectl apply --validate=strict`` checks them (unknown
fields are errors). Shared by the manifest tests."""

from __future__ import annotations

import copy
import functools

import jsonschema
import pytest
import yaml

from .paths import SHARED

# The CRDs with their real schemas sit beside the clone: ../shared/crds.
CRDS = SHARED / "crds"

# libyaml's loader when PyYAML has it: the InferenceService CRD is 2 MB of YAML.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# ObjectMeta as far as these manifests use it; strings only, like the API server wants them.
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}


def strict(schema: dict) -> dict:
    """A CRD structural schema as JSON Schema that rejects unknown fields, as the API server does for
    ``--validate=strict``: objects with ``properties`` get ``additionalProperties: false`` unless they
    say otherwise or preserve unknown fields; int-or-string accepts both."""
    out = dict(schema)
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in schema:
        out["type"] = [schema["type"], "null"]
    if "properties" in schema:
        out["properties"] = {key: strict(sub) for key, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        out["items"] = strict(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [strict(sub) for sub in schema[key]]
    return out


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """(apiVersion, kind) -> validator, for every served version of every CRD in ../shared/crds."""
    if not CRDS.is_dir():
        pytest.skip(f"the CRDs are not at {CRDS} (../shared/crds beside the repository)")
    validators = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=YAML_LOADER):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    schema = strict(version["schema"]["openAPIV3Schema"])
                    schema["properties"]["metadata"] = OBJECT_META
                    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
                    jsonschema.Draft7Validator.check_schema(schema)  # the conversion kept it a schema
                    validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def schema_errors(obj: dict) -> list[str]:
    """Where and how ``obj`` breaks its CRD's schema; [] when it validates."""
    validator = crd_validators().get((obj.get("apiVersion"), obj.get("kind")))
    assert validator is not None, f"no served CRD version for {obj.get('apiVersion')} {obj.get('kind')}"
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                  for e in validator.iter_errors(obj))


def with_value(obj: dict, path: str, value) -> dict:
    """A copy of ``obj`` with the field at dotted ``path`` (list indexes as numbers) set to ``value``."""
    obj = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = obj
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    return obj
