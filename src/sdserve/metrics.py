"""Prometheus metrics, served on KServe's ``/metrics`` (the default registry), prefix ``sdserve_``."""

from prometheus_client import Counter, Gauge, Histogram

# Generation takes seconds to minutes (SDXL on a small GPU, or a CPU): buckets reach 10 minutes.
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 90, 120, 180, 300, 600)

QUEUE_DEPTH = Gauge("sdserve_queue_depth", "Requests waiting for the GPU worker")
BATCH_IMAGES = Histogram(
    "sdserve_batch_size_images", "Images generated per batch", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
)
IMAGES = Counter("sdserve_images_generated", "Images generated")
GENERATION_SECONDS = Histogram(
    "sdserve_generation_seconds", "Wall time of one batch through the pipelines", buckets=_SECONDS
)
QUEUE_SECONDS = Histogram("sdserve_queue_wait_seconds", "Time a request waited before its batch started", buckets=_SECONDS)
REQUEST_SECONDS = Histogram(
    "sdserve_request_seconds", "Time from request parsed to response encoded", ["protocol"], buckets=_SECONDS
)
REQUESTS = Counter("sdserve_requests", "Generation requests received", ["protocol"])
FAILURES = Counter("sdserve_request_failures", "Requests that failed, by reason", ["reason"])
OOM_RETRIES = Counter("sdserve_oom_retries", "Pipeline calls that ran out of memory and were retried in halves")
