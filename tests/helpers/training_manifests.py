"""The training manifests in manifests/training/ as their tests read them: every file's documents,
one object by kind and file (or from manifests/ above), the data connection, and the PodSpec of every
pod they make. Shared by tests/training/test_training_manifests*.py."""

from __future__ import annotations

import functools

import yaml

from .paths import REPO

ROOT = REPO
TRAINING = ROOT / "manifests" / "training"


# --- loading -------------------------------------------------------------------------------------

@functools.cache
def training_files() -> dict[str, list[dict]]:
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
            for path in sorted(TRAINING.glob("*.yaml"))}


def the(kind: str, file: str) -> dict:
    (obj,) = [doc for doc in training_files()[file] if doc["kind"] == kind]
    return obj


def top_manifest(kind: str, file: str) -> dict:
    (obj,) = [doc for doc in yaml.safe_load_all((ROOT / "manifests" / file).read_text()) if doc["kind"] == kind]
    return obj


def data_connection() -> dict:
    return top_manifest("Secret", "data-connection.yaml")


def pod_specs() -> list[tuple[str, dict]]:
    """(where, PodSpec) of every pod the training manifests make."""
    job, ray, torch = the("Job", "job.yaml"), the("RayJob", "rayjob.yaml"), the("PyTorchJob", "pytorchjob.yaml")
    found = [("job", job["spec"]["template"]["spec"]), ("upload", the("Pod", "storage.yaml")["spec"]),
             ("ray head", ray["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"])]
    found += [(f"ray {group['groupName']}", group["template"]["spec"])
              for group in ray["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    found += [(f"pytorch {kind}", spec["template"]["spec"]) for kind, spec in torch["spec"]["pytorchReplicaSpecs"].items()]
    return found


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
