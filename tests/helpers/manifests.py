"""The Kubernetes manifests in manifests/ as the manifest tests read them: every file's documents
(and the objects inside a Template), one object by kind and file, the ServingRuntime's container and
the sdserve config its args give. Shared by tests/server/test_manifests*.py."""

from __future__ import annotations

import functools

import yaml

from sdserve.server.settings import load_config

from .paths import REPO

MANIFESTS = REPO / "manifests"

MODEL_NAME = "sdxl"  # what KServe substitutes for {{.Name}}: the InferenceService's name


# --- loading -------------------------------------------------------------------------------------

@functools.cache
def manifest_files() -> dict[str, list[dict]]:
    """Every YAML file in manifests/ and all its documents."""
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
            for path in sorted(MANIFESTS.glob("*.yaml"))}


def objects() -> list[tuple[str, dict]]:
    """(where, object) for every document, and for every object inside a Template."""
    found = []
    for name, docs in manifest_files().items():
        for i, doc in enumerate(docs):
            found.append((f"{name}[{i}]", doc))
            if doc.get("kind") == "Template":
                found += [(f"{name}[{i}].objects[{j}]", obj) for j, obj in enumerate(doc.get("objects", []))]
    return found


def of_kind(kind: str, file: str | None = None) -> list[dict]:
    return [obj for where, obj in objects() if obj.get("kind") == kind and (file is None or where.startswith(file))]


def the(kind: str, file: str) -> dict:
    (obj,) = of_kind(kind, file + "[")
    return obj


def runtime() -> dict:
    return the("ServingRuntime", "servingruntime.yaml")


def container(rt: dict) -> dict:
    (c,) = [c for c in rt["spec"]["containers"] if c["name"] == "kserve-container"]
    return c


def runtime_config(rt: dict):
    c = container(rt)
    assert "command" not in c, "the image's ENTRYPOINT (python -m sdserve) runs the server"
    assert "--model_name={{.Name}}" in c["args"], "the model is named after the InferenceService"
    return load_config([arg.replace("{{.Name}}", MODEL_NAME) for arg in c["args"]])
