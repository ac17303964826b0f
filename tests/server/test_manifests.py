"""The Kubernetes manifests in manifests/: every InferenceService and ServingRuntime is checked against
the KServe CRD schemas the way ``kubectl apply --validate=strict`` checks it (unknown fields are
errors), the runtime's args are parsed by sdserve's own parser, and the files agree with each other
(names, formats, ports, timeouts, GPU, auth, dashboard metadata). How the InferenceServices scale is
in test_manifests_scaling.py."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter

import pytest

from helpers.crd_schema import schema_errors, with_value
from helpers.manifests import MANIFESTS, MODEL_NAME, container, manifest_files, objects, runtime, runtime_config, the
from sdserve.server.settings import load_config

MIN_TIMEOUT_S = 300  # an SDXL 1024x1024 request with the refiner, queued behind a few others


# From S3 through a data connection; inferenceservice-oci.yaml serves a model image instead.
INFERENCE_SERVICES = ["inferenceservice-raw.yaml", "inferenceservice-serverless.yaml", "inferenceservice-keda.yaml"]
EVERY_INFERENCE_SERVICE = [*INFERENCE_SERVICES, "inferenceservice-oci.yaml"]
KSERVE_OBJECTS = [(where, obj) for where, obj in objects() if obj.get("kind") in ("InferenceService", "ServingRuntime")]


# --- small parsers -------------------------------------------------------------------------------

def quantity_bytes(value: str | int) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(value))
    assert match, f"unexpected quantity {value!r}"
    number, unit = match.groups()
    scale = {None: 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[unit]
    return float(number) * scale


def haproxy_seconds(value: str) -> float:
    """HAProxy time: a number with us/ms/s/m/h/d; without a unit it is milliseconds."""
    match = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert match, f"unexpected route timeout {value!r}"
    number, unit = match.groups()
    return int(number) * {"us": 1e-6, "ms": 1e-3, None: 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


# --- every file, and the CRD schemas -------------------------------------------------------------

def test_every_manifest_parses_and_the_expected_objects_are_there():
    files = manifest_files()
    assert files and all(files.values()), "every YAML file in manifests/ has at least one document"
    for where, obj in objects():
        assert isinstance(obj, dict) and obj.get("apiVersion") and obj.get("kind"), where
    kinds = Counter(obj["kind"] for _, obj in objects())
    # A kind this file has no checks for needs some first.
    assert set(kinds) <= {"ServingRuntime", "Template", "InferenceService", "Secret", "Kustomization",
                          "PodMonitor"}, kinds
    assert kinds >= Counter({"ServingRuntime": 2, "InferenceService": 4, "Template": 1, "Secret": 1}), kinds


@pytest.mark.parametrize("where, obj", KSERVE_OBJECTS, ids=[where for where, _ in KSERVE_OBJECTS])
def test_kserve_objects_validate_strictly_against_the_crd(where, obj):
    assert schema_errors(obj) == []


@pytest.mark.parametrize("file, path, value, expected", [
    ("inferenceservice-raw.yaml", "spec.predictor.timout", 600, "'timout' was unexpected"),
    ("inferenceservice-raw.yaml", "spec.predictor.minReplicas", "1", "'1' is not of type 'integer'"),
    ("inferenceservice-raw.yaml", "spec.predictor.scaleMetric", "gpu", "'gpu' is not one of"),
    ("inferenceservice-raw.yaml", "spec.predictor.model.resources.limits.memory", "lots", "does not match"),
    ("inferenceservice-raw.yaml", "metadata.annotation", {}, "'annotation' was unexpected"),
    ("inferenceservice-raw.yaml", "metadata.annotations.prometheus.io/scrape", True, "True is not of type 'string'"),
    ("servingruntime.yaml", "spec.containers.0.imagePullPolicyy", "Always", "'imagePullPolicyy' was unexpected"),
    ("servingruntime.yaml", "spec.containers.0.ports.0.containerPort", "8080", "'8080' is not of type 'integer'"),
])
def test_the_validator_rejects_unknown_fields_and_wrong_types(file, path, value, expected):
    obj = the("InferenceService" if file.startswith("inference") else "ServingRuntime", file)
    if path.startswith("metadata.annotations."):  # annotation keys hold dots
        obj = copy.deepcopy(obj)
        obj["metadata"]["annotations"][path.removeprefix("metadata.annotations.")] = value
    else:
        obj = with_value(obj, path, value)
    errors = schema_errors(obj)
    assert any(expected in error for error in errors), errors


def test_int_or_string_fields_take_both():
    rt = runtime()
    for port in (8080, "http1"):
        assert schema_errors(with_value(rt, "spec.containers.0.readinessProbe.httpGet.port", port)) == []
    assert schema_errors(with_value(rt, "spec.containers.0.readinessProbe.httpGet.port", 80.5)) != []


# --- the runtime and its Template ----------------------------------------------------------------


def test_runtime_args_are_valid_sdserve_flags():
    config = runtime_config(runtime())
    assert config.args.model_name == MODEL_NAME
    assert config.model.model_dir == "/mnt/models"  # where the storage initializer puts the model
    assert config.model.refiner_dir is None  # <model_dir>/refiner, from the same S3 prefix
    assert config.model.device == "cuda"
    assert (config.args.http_port, config.args.grpc_port) == (8080, 8081)  # KServe's ports
    assert config.args.enable_grpc


def test_sdserves_parser_rejects_a_bad_flag():
    with pytest.raises(SystemExit) as exc:
        load_config(["--model_dir=/mnt/models", "--max_batch_imgs=4"])
    assert exc.value.code == 2


def test_runtime_container_ports_probes_and_metrics():
    rt = runtime()
    assert rt["spec"]["multiModel"] is False
    c = container(rt)
    http_port = runtime_config(rt).args.http_port
    # Knative accepts one container port; it is the HTTP one.
    assert [p["containerPort"] for p in c["ports"]] == [http_port]
    probes = {kind: c[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for probe in probes.values():
        assert probe["httpGet"]["port"] == http_port
    assert probes["startupProbe"]["httpGet"]["path"] in ("/v2/health/ready", "/v2/models/{{.Name}}/ready")
    assert probes["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "SDXL base + refiner load slowly"
    pod_annotations = rt["spec"]["annotations"]
    assert pod_annotations["prometheus.io/scrape"] == "true"
    assert pod_annotations["prometheus.io/port"] == str(http_port)
    assert pod_annotations["prometheus.io/path"] == "/metrics"


def gpu_limit(resources: dict) -> int:
    return int(resources["limits"]["nvidia.com/gpu"])


def tolerates_gpu_taint(tolerations: list[dict]) -> bool:
    return {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_runtime_has_a_gpu_shm_and_the_gpu_toleration():
    rt = runtime()
    c = container(rt)
    assert gpu_limit(c["resources"]) == 1
    assert tolerates_gpu_taint(rt["spec"]["tolerations"])
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in rt["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"


def test_runtime_is_offered_by_the_dashboard():
    meta = runtime()["metadata"]
    assert meta["labels"]["opendatahub.io/dashboard"] == "true"
    assert json.loads(meta["annotations"]["opendatahub.io/recommended-accelerators"]) == ["nvidia.com/gpu"]
    assert meta["annotations"]["openshift.io/display-name"]


def test_template_wraps_the_same_servingruntime():
    template = the("Template", "template.yaml")
    assert template["objects"] == [runtime()], "template.yaml and servingruntime.yaml differ"


def test_template_has_the_dashboard_metadata():
    template = the("Template", "template.yaml")
    assert template["apiVersion"] == "template.openshift.io/v1"
    assert set(template) <= {"apiVersion", "kind", "metadata", "objects", "parameters", "labels", "message"}
    meta = template["metadata"]
    assert meta["labels"]["opendatahub.io/dashboard"] == "true"
    annotations = meta["annotations"]
    assert json.loads(annotations["opendatahub.io/modelServingSupport"]) == ["single"]
    assert annotations["opendatahub.io/apiProtocol"] == "REST"
    for key in ("openshift.io/display-name", "openshift.io/provider-display-name", "description", "tags"):
        assert annotations[key].strip(), key


# --- the InferenceServices -----------------------------------------------------------------------

@pytest.mark.parametrize("file", INFERENCE_SERVICES)
def test_inferenceservice_uses_the_runtime_and_the_data_connection(file):
    isvc = the("InferenceService", file)
    model = isvc["spec"]["predictor"]["model"]
    rt = runtime()
    assert model["runtime"] == rt["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in rt["spec"]["supportedModelFormats"]]
    assert model["storage"]["key"] == the("Secret", "data-connection.yaml")["metadata"]["name"]
    assert model["storage"]["path"] and not model["storage"]["path"].startswith("/")
    assert isvc["metadata"]["name"] == MODEL_NAME  # the README's URLs


@pytest.mark.parametrize("file", EVERY_INFERENCE_SERVICE)
def test_inferenceservice_timeouts_fit_sdxl(file):
    isvc = the("InferenceService", file)
    predictor_timeout = isvc["spec"]["predictor"]["timeout"]
    route_timeout = haproxy_seconds(isvc["metadata"]["annotations"]["haproxy.router.openshift.io/timeout"])
    assert predictor_timeout >= MIN_TIMEOUT_S
    assert route_timeout >= predictor_timeout, "the route would cut requests Knative still allows"


@pytest.mark.parametrize("file", EVERY_INFERENCE_SERVICE)
def test_inferenceservice_is_authenticated_and_gets_a_gpu(file):
    isvc = the("InferenceService", file)
    assert isvc["metadata"]["annotations"]["security.opendatahub.io/enable-auth"] == "true"
    predictor = isvc["spec"]["predictor"]
    resources = predictor["model"]["resources"]
    assert gpu_limit(resources) == 1
    assert int(resources["requests"]["nvidia.com/gpu"]) == 1  # extended resources: requests = limits
    assert quantity_bytes(resources["requests"]["memory"]) >= 24 * 2**30  # weights pass through RAM
    assert quantity_bytes(resources["limits"]["memory"]) >= quantity_bytes(resources["requests"]["memory"])
    assert tolerates_gpu_taint(predictor["tolerations"])


# --- the data connection and the kustomization ---------------------------------------------------

PLACEHOLDER = re.compile(r"<[^<>]+>")


def test_data_connection_is_an_openshift_ai_s3_connection_with_placeholders():
    secret = the("Secret", "data-connection.yaml")
    assert secret["metadata"]["labels"]["opendatahub.io/dashboard"] == "true"
    annotations = secret["metadata"]["annotations"]
    assert annotations["opendatahub.io/connection-type"] == "s3"
    assert annotations["openshift.io/display-name"]
    data = secret["stringData"]
    assert set(data) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_S3_ENDPOINT", "AWS_DEFAULT_REGION",
                         "AWS_S3_BUCKET"}
    assert all(isinstance(value, str) for value in data.values())
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_S3_BUCKET"):
        assert PLACEHOLDER.fullmatch(data[key]), f"{key} must be a <placeholder>"
    assert "data" not in secret, "base64 data could hide a real secret"


def test_no_manifest_holds_something_like_a_real_credential():
    for path in sorted(MANIFESTS.glob("*.yaml")):
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path.name}: an AWS access key id"
        assert not re.search(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])", text), \
            f"{path.name}: something like an AWS secret key"


def test_kustomization_deploys_one_inferenceservice():
    """The InferenceService files are alternatives with the same name: one at a time."""
    resources = manifest_files()["kustomization.yaml"][0]["resources"]
    isvcs = [doc for resource in resources for doc in manifest_files()[resource] if doc["kind"] == "InferenceService"]
    assert len(isvcs) == 1 and "inferenceservice-raw.yaml" in resources
    assert {the("InferenceService", file)["metadata"]["name"] for file in INFERENCE_SERVICES} == {MODEL_NAME}


def test_kustomization_lists_existing_manifests():
    kustomization = manifest_files()["kustomization.yaml"][0]
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "namespace", "labels", "commonAnnotations"}
    for resource in kustomization["resources"]:
        assert (MANIFESTS / resource).is_file(), resource
        kinds = {doc["kind"] for doc in manifest_files()[resource]}
        assert "Template" not in kinds, "the Template goes to the dashboard's namespace, not the project's"
