"""A model as an OCI image (KServe's modelcar): the InferenceService that serves it from
``storageUri: oci://...`` and the Containerfile that builds it. The CRD validation, timeouts, auth,
GPU and grace period of this InferenceService are checked with the others (test_manifests*.py);
building, mounting and serving the image is tests/container/test_model_image.py."""

from __future__ import annotations

import re

from helpers.crd_schema import schema_errors, with_value
from helpers.manifests import MODEL_NAME, runtime, the
from helpers.paths import REPO

OCI_FILE = "inferenceservice-oci.yaml"
CONTAINERFILE = REPO / "Containerfile.model"


def test_the_model_comes_from_an_oci_image_and_nothing_else():
    isvc = the("InferenceService", OCI_FILE)
    model = isvc["spec"]["predictor"]["model"]
    assert re.fullmatch(r"oci://[a-z0-9.-]+(:\d+)?/[\w./-]+(:[\w.-]+|@sha256:[0-9a-f]{64})", model["storageUri"])
    assert "storage" not in model, "a data connection and an OCI image are two sources for one model"
    rt = runtime()
    assert model["runtime"] == rt["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in rt["spec"]["supportedModelFormats"]]
    assert isvc["metadata"]["name"] == MODEL_NAME
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_a_private_registry_gets_its_pull_secret():
    predictor = the("InferenceService", OCI_FILE)["spec"]["predictor"]
    assert [s["name"] for s in predictor["imagePullSecrets"]]
    # the CRD knows the field where it is (a misplaced one would be ignored by a lenient apply)
    assert schema_errors(with_value(the("InferenceService", OCI_FILE), "spec.predictor.model.imagePullSecrets", [])) != []


def test_the_runtime_reads_the_model_where_kserve_mounts_it():
    args = next(c for c in runtime()["spec"]["containers"] if c["name"] == "kserve-container")["args"]
    assert "--model_dir=/mnt/models" in args  # KServe links the model image's /models there


def test_the_model_containerfile_layers_base_refiner_and_adapters_and_runs_as_no_root():
    text = CONTAINERFILE.read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith(("#", " "))]
    final = instructions[max(i for i, line in enumerate(instructions) if line.startswith("FROM")):]
    copies = [line.split()[-1] for line in final if line.startswith("COPY")]
    assert copies == ["/models/base", "/models/refiner", "/models/loras"]  # stablest first: one layer each
    assert all("--chown=0:0" in line for line in final if line.startswith("COPY"))
    users = [line.split()[1] for line in final if line.startswith("USER")]
    assert users and users[-1] not in ("0", "root")
    assert "ubi-micro" in text.split("ARG BASE_IMAGE=", 1)[1].splitlines()[0]  # has sh, ln and sleep for KServe
