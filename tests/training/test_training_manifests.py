"""The training manifests in manifests/training/: the RayJob and the PyTorchJob are checked against
KubeRay's and the training operator's CRDs the way ``kubectl apply --validate=strict`` checks them,
the plain Job, Pod and PVC against the core shapes (their pod templates against the PodTemplateSpec
schema the CRDs embed), and every pod gets the data connection, the one image, the restricted SCC
and the GPU toleration it needs. The command lines and each job's own shape are in
test_training_manifests_jobs.py."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from helpers.crd_schema import CRDS, OBJECT_META, YAML_LOADER, schema_errors, strict, with_value
from helpers.training_manifests import (
    ROOT,
    TRAINING,
    data_connection,
    gpus,
    pod_specs,
    the,
    top_manifest,
    training_files,
)

# --- core shapes (no CRD): Job, Pod, PVC, with the PodTemplateSpec schema the CRDs embed ----------

@functools.cache
def pod_template_schema() -> dict:
    """core/v1 PodTemplateSpec as the training operator's CRD embeds it, strict."""
    if not CRDS.is_dir():
        pytest.skip(f"the CRDs are not at {CRDS} (../shared/crds beside the repository)")
    crd = yaml.load((CRDS / "kubeflow.org_pytorchjobs.yaml").read_text(), Loader=YAML_LOADER)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    return strict(spec["pytorchReplicaSpecs"]["additionalProperties"]["properties"]["template"])


INT = {"type": "integer"}
QUANTITY = {"type": "string", "pattern": r"^\d+(\.\d+)?([KMGTPE]i?|m)?$"}


def core_schema(kind: str) -> dict:
    def obj(required: list[str], properties: dict) -> dict:
        return {"type": "object", "required": required, "properties": properties, "additionalProperties": False}

    if kind == "Job":  # batch/v1 JobSpec, the fields a training Job uses and a few neighbours
        rule = obj(["action"], {
            "action": {"enum": ["FailJob", "FailIndex", "Ignore", "Count"]},
            "onExitCodes": obj(["operator", "values"], {
                "containerName": {"type": "string"}, "operator": {"enum": ["In", "NotIn"]},
                "values": {"type": "array", "items": INT, "minItems": 1}}),
            "onPodConditions": {"type": "array", "items": obj(["type"], {
                "type": {"type": "string"}, "status": {"enum": ["True", "False", "Unknown"]}})},
        })
        spec = obj(["template"], {
            "template": pod_template_schema(), "backoffLimit": INT, "activeDeadlineSeconds": INT,
            "ttlSecondsAfterFinished": INT, "completions": INT, "parallelism": INT, "suspend": {"type": "boolean"},
            "podFailurePolicy": obj(["rules"], {"rules": {"type": "array", "items": rule}}),
        })
        api = "batch/v1"
    elif kind == "Pod":
        spec, api = pod_template_schema()["properties"]["spec"], "v1"
    elif kind == "PersistentVolumeClaim":
        spec = obj(["accessModes", "resources"], {
            "accessModes": {"type": "array", "minItems": 1,
                            "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}},
            "resources": obj(["requests"], {"requests": obj(["storage"], {"storage": QUANTITY})}),
            "storageClassName": {"type": "string"}, "volumeMode": {"enum": ["Filesystem", "Block"]},
        })
        api = "v1"
    else:
        raise AssertionError(f"no core schema for {kind}")
    return obj(["apiVersion", "kind", "metadata", "spec"], {
        "apiVersion": {"const": api}, "kind": {"const": kind}, "metadata": OBJECT_META, "spec": spec})


def errors(obj: dict) -> list[str]:
    """Schema errors of any object in these files: CRD kinds by their CRD, core kinds by core_schema."""
    if obj["kind"] in ("RayJob", "PyTorchJob"):
        return schema_errors(obj)
    validator = jsonschema.Draft7Validator(core_schema(obj["kind"]))
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(obj))


# --- every file, and the schemas -----------------------------------------------------------------

def test_training_files_hold_the_expected_objects():
    kinds = {name: sorted(doc["kind"] for doc in docs) for name, docs in training_files().items()}
    assert kinds == {
        "job.yaml": ["Job"],
        "pytorchjob.yaml": ["PyTorchJob"],
        "rayjob.yaml": ["RayJob"],
        "storage.yaml": ["PersistentVolumeClaim", "Pod"],
    }


OBJECTS = [(f"{name}:{doc['kind']}", doc) for name, docs in training_files().items() for doc in docs]


@pytest.mark.parametrize("where, obj", OBJECTS, ids=[where for where, _ in OBJECTS])
def test_training_objects_validate_strictly(where, obj):
    assert errors(obj) == []


@pytest.mark.parametrize("file, kind, path, value, expected", [
    ("rayjob.yaml", "RayJob", "spec.shutdownAfterJobFinish", True, "'shutdownAfterJobFinish' was unexpected"),
    ("rayjob.yaml", "RayJob", "spec.rayClusterSpec.workerGroupSpecs.0.replicas", "2", "'2' is not of type 'integer'"),
    ("rayjob.yaml", "RayJob", "spec.rayClusterSpec.headGroupSpec.rayStartParams.num-gpus", 0,
     "0 is not of type 'string'"),
    ("pytorchjob.yaml", "PyTorchJob", "spec.pytorchReplicaSpecs.Master.template.spec.containers.0.comand", [],
     "'comand' was unexpected"),
    ("pytorchjob.yaml", "PyTorchJob", "spec.nprocPerNode", 1, "1 is not of type 'string'"),
    ("job.yaml", "Job", "spec.backofLimit", 3, "'backofLimit' was unexpected"),
    ("job.yaml", "Job", "spec.template.spec.containers.0.args", "train", "'train' is not of type 'array'"),
    ("job.yaml", "Job", "spec.template.spec.volumes.0.persistentVolumeClaim.claim", "x", "'claim' was unexpected"),
    ("storage.yaml", "PersistentVolumeClaim", "spec.accessModes", ["ReadWriteAll"], "'ReadWriteAll' is not one of"),
    ("storage.yaml", "Pod", "spec.containers.0.securityContext.runAsNonroot", True, "'runAsNonroot' was unexpected"),
])
def test_the_validators_reject_unknown_fields_and_wrong_types(file, kind, path, value, expected):
    found = errors(with_value(the(kind, file), path, value))
    assert any(expected in error for error in found), found


def test_training_manifests_are_not_deployed_with_the_model_server():
    kustomization = top_manifest("Kustomization", "kustomization.yaml")
    assert not any(resource.startswith("training") for resource in kustomization["resources"])


def test_no_training_manifest_holds_something_like_a_real_credential():
    for path in sorted(TRAINING.glob("*.yaml")):
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path.name}: an AWS access key id"
        assert not re.search(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])", text), path.name


# --- every pod -----------------------------------------------------------------------------------

def test_every_pod_gets_the_data_connection_and_the_same_image():
    secret = data_connection()["metadata"]["name"]
    images = set()
    for where, spec in pod_specs():
        for container in spec["containers"]:
            images.add(container["image"])
            if where != "upload":
                assert {"secretRef": {"name": secret}} in container.get("envFrom", []), where
    (image,) = images
    assert image.startswith("registry.example.com/sdserve-train:"), "a CHANGE ME placeholder, one image"


def image_cache_dir() -> str:
    """XDG_CACHE_HOME as the Containerfile sets it (the model download goes below it)."""
    text = (ROOT / "Containerfile").read_text()
    return re.search(r"XDG_CACHE_HOME=(\S+)", text).group(1)


def test_pods_run_under_the_restricted_scc_with_writable_caches():
    cache = image_cache_dir()
    for where, spec in pod_specs():
        assert "securityContext" not in spec or "runAsUser" not in spec["securityContext"], where
        for container in spec["containers"]:
            context = container["securityContext"]
            assert "runAsUser" not in context, f"{where}: OpenShift picks the UID"
            assert context["runAsNonRoot"] is True and context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"] and context["seccompProfile"]["type"] == "RuntimeDefault"
            if where == "upload":
                continue
            # the model download cache on a volume: XDG_CACHE_HOME pointed at one, or one mounted at the image's
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            mounts = [m["mountPath"] for m in container["volumeMounts"]]
            target = env.get("XDG_CACHE_HOME", cache)
            assert any(Path(target).is_relative_to(mount) for mount in mounts), f"{where}: {target} is not on a volume"
            assert "/dev/shm" in mounts, f"{where}: PyTorch needs more than the default 64 MiB of shared memory"


def test_gpu_pods_tolerate_the_gpu_taint_and_request_what_they_limit():
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    for where, spec in pod_specs():
        for container in spec["containers"]:
            if gpus(container):
                assert toleration in spec.get("tolerations", []), where
                assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == gpus(container), where
