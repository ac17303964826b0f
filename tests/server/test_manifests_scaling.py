"""How the InferenceServices in manifests/ scale: the raw deployment's HPA, Knative's concurrency
(serverless) and KEDA on sdserve_images_pending (its query, threshold, authentication and
scale-down, the PodMonitor that gets the metric to Thanos), each worked out from the runtime's
batch size, and a termination grace period longer than sdserve's drain."""

from __future__ import annotations

import copy
import re

import pytest

from helpers.crd_schema import schema_errors
from helpers.manifests import container, runtime, runtime_config, the
from sdserve import metrics

# Per-replica images in flight both autoscalers aim at: one denoiser call's worth running
# (--max_batch_images) and one more waiting behind it. The KEDA threshold (images pending per
# replica) and Knative's containerConcurrency (requests per replica) are this times the flag.
BATCHES_IN_FLIGHT = 2


# --- the HPA (raw deployment) and Knative (serverless) -------------------------------------------

def test_raw_deployment_scales_with_the_hpa():
    isvc = the("InferenceService", "inferenceservice-raw.yaml")
    annotations, predictor = isvc["metadata"]["annotations"], isvc["spec"]["predictor"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["scaleMetric"] in ("cpu", "memory")
    # KServe would point prometheus.io/port at Knative's queue-proxy, which raw pods lack.
    assert annotations.get("serving.kserve.io/enable-prometheus-scraping") != "true"


def test_serverless_scales_on_concurrency_and_may_scale_to_zero():
    isvc = the("InferenceService", "inferenceservice-serverless.yaml")
    predictor = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    assert 0 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["scaleMetric"] == "concurrency"
    config = runtime_config(runtime())
    assert 1 <= predictor["scaleTarget"] <= predictor["containerConcurrency"]
    # Excess requests wait in Knative (and may go to a new replica), not in sdserve's 503-ing queue.
    assert predictor["containerConcurrency"] <= config.engine.max_queue


def test_serverless_concurrency_follows_from_the_batch_size():
    """Knative counts requests in flight (one image each by default): it aims at one denoiser call's
    worth per replica and lets in one more batch before holding requests back."""
    predictor = the("InferenceService", "inferenceservice-serverless.yaml")["spec"]["predictor"]
    engine = runtime_config(runtime()).engine
    assert predictor["scaleTarget"] == engine.max_batch_images
    assert predictor["containerConcurrency"] == BATCHES_IN_FLIGHT * engine.max_batch_images
    # All admitted to the step loop at once: none waits in sdserve's queue while Knative holds others.
    assert predictor["containerConcurrency"] <= engine.active_limit


# --- KEDA: scaling on sdserve_images_pending -----------------------------------------------------

KEDA_FILE = "inferenceservice-keda.yaml"
# OpenShift's Thanos querier, tenancy port (namespace-scoped, token needs `get pods` there).
THANOS_TENANCY = "https://thanos-querier.openshift-monitoring.svc.cluster.local:9092"


def keda_metric() -> dict:
    (metric,) = the("InferenceService", KEDA_FILE)["spec"]["predictor"]["autoScaling"]["metrics"]
    assert metric["type"] == "External"
    return metric["external"]


def exported_metrics() -> dict[str, object]:
    """sdserve's own metrics by name (a Counter's samples add _total)."""
    from prometheus_client.metrics import MetricWrapperBase

    return {obj.describe()[0].name: obj for obj in vars(metrics).values() if isinstance(obj, MetricWrapperBase)}


def test_keda_variant_is_raw_deployment_with_the_keda_autoscaler():
    isvc = the("InferenceService", KEDA_FILE)
    annotations, predictor = isvc["metadata"]["annotations"], isvc["spec"]["predictor"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"  # KEDA: raw mode only
    assert annotations["serving.kserve.io/autoscalerClass"] == "keda"
    assert annotations.get("serving.kserve.io/enable-prometheus-scraping") != "true"
    # KServe's webhook rejects scaleMetric with KEDA; scaleTarget would mean nothing.
    assert "scaleMetric" not in predictor and "scaleTarget" not in predictor
    # No scale to zero: with no replica there is no metric to wake one up.
    assert 1 <= predictor["minReplicas"] < predictor["maxReplicas"]


def test_keda_query_sums_a_gauge_sdserve_exports_over_this_inferenceservices_pods():
    metric = keda_metric()["metric"]
    assert metric["backend"] == "prometheus"
    assert metric["serverAddress"] == THANOS_TENANCY
    assert metric["namespace"], "the tenancy port answers for one namespace, sent by KEDA"
    query, name = metric["query"], the("InferenceService", KEDA_FILE)["metadata"]["name"]
    (used,) = set(re.findall(r"\bsdserve_\w+", query))
    exported = exported_metrics()
    assert used in exported, f"{used} is not one of sdserve's metrics: {sorted(exported)}"
    assert type(exported[used]).__name__ == "Gauge", "a sum over pods needs a gauge (a counter needs rate())"
    assert used == "sdserve_images_pending"
    # The Deployment KServe makes is <name>-predictor; its pods are <name>-predictor-<hash>-<hash>.
    assert f'pod=~"{name}-predictor-.*"' in query
    # Each pod once, even when two monitors scrape it; then the total, which KEDA averages per replica.
    assert query.replace(" ", "").startswith("sum(maxby(pod)(")


def test_keda_threshold_is_images_per_replica_from_the_runtime_batch_size():
    target = keda_metric()["target"]
    max_batch = runtime_config(runtime()).engine.max_batch_images
    # KServe passes `value` on as KEDA's threshold (KEDA averages it per replica); it needs it set.
    assert target["type"] == "Value" and "value" in target
    threshold = float(target["value"])
    assert threshold == BATCHES_IN_FLIGHT * max_batch
    assert threshold >= max_batch, "below one full denoiser call, replicas are added before a GPU is busy"


def test_keda_authenticates_with_openshift_ais_trigger_authentication():
    assert keda_metric()["authenticationRef"] == {
        "authModes": "bearer",
        "authenticationRef": {"name": "inference-prometheus-auth"},
    }


def test_a_flat_authentication_ref_is_rejected_by_the_crd():
    isvc = copy.deepcopy(the("InferenceService", KEDA_FILE))
    isvc["spec"]["predictor"]["autoScaling"]["metrics"][0]["external"]["authenticationRef"] = {
        "name": "inference-prometheus-auth"}
    errors = schema_errors(isvc)
    where = "spec.predictor.autoScaling.metrics.0.external.authenticationRef"
    assert f"{where}: 'authenticationRef' is a required property" in errors, errors
    assert any(e.startswith(where) and "'name' was unexpected" in e for e in errors), errors


def test_keda_scales_down_slowly_and_replicas_drain_before_they_are_killed():
    predictor = the("InferenceService", KEDA_FILE)["spec"]["predictor"]
    scale_down = predictor["autoScaling"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 300  # a pause between bursts keeps the replica
    assert {"type": "Pods", "value": 1, "periodSeconds": 120} in scale_down["policies"]
    assert predictor["autoScaling"]["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0


@pytest.mark.parametrize("file", ["inferenceservice-raw.yaml", KEDA_FILE, "inferenceservice-oci.yaml"])
def test_termination_grace_period_exceeds_sdserves_drain(file):
    predictor = the("InferenceService", file)["spec"]["predictor"]
    drain = runtime_config(runtime()).args.grace_period  # --grace_period: SIGTERM to exit
    assert predictor["terminationGracePeriodSeconds"] > drain, "the kubelet would kill requests mid-drain"


def test_pod_monitor_scrapes_the_keda_inferenceservices_pods():
    """User-workload monitoring ignores prometheus.io/* annotations: the PodMonitor is what makes
    sdserve_images_pending reach Thanos."""
    monitor = the("PodMonitor", KEDA_FILE)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"} and set(monitor["metadata"]) == {"name"}
    spec = monitor["spec"]
    assert set(spec) == {"selector", "podMetricsEndpoints"}
    name = the("InferenceService", KEDA_FILE)["metadata"]["name"]
    assert spec["selector"] == {"matchLabels": {"serving.kserve.io/inferenceservice": name}}
    rt = runtime()
    (endpoint,) = spec["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "scheme", "interval"}
    (port,) = container(rt)["ports"]
    assert endpoint["port"] == port["name"] and port["containerPort"] == runtime_config(rt).args.http_port
    assert endpoint["path"] == rt["spec"]["annotations"]["prometheus.io/path"]
    assert endpoint["scheme"] == "http"
    assert re.fullmatch(r"\d+s", endpoint["interval"]) and int(endpoint["interval"][:-1]) <= 30  # KEDA polls every 30 s
