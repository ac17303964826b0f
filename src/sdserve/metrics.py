"""Prometheus metrics, served on KServe's ``/metrics`` (the default registry), prefix ``sdserve_``."""

from prometheus_client import Counter, Gauge, Histogram

# Generation takes seconds to minutes (SDXL on a small GPU, or a CPU): buckets reach 10 minutes.
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 90, 120, 180, 300, 600)

QUEUE_DEPTH = Gauge("sdserve_queue_depth", "Requests waiting for the GPU worker")
BATCH_IMAGES = Histogram(
    "sdserve_batch_size_images", "Images in one denoiser call", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
)
DENOISER_ROWS = Counter("sdserve_denoiser_rows_run", "Denoiser rows run: through the whole denoiser (full) or with "
                        "reused deep features (cached)", ["work"])  # full | cached
ROWS_SAVED = Counter("sdserve_denoiser_rows_saved", "Denoiser work saved, in rows: unconditional rows not run outside "
                     "a guidance_interval, rows that reused deep features (cache)", ["reason"])
ROWS_PER_CALL = Histogram(
    "sdserve_denoiser_rows", "Rows in one denoiser call (two per image with classifier-free guidance)",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128),
)
DENOISER_CALLS = Counter("sdserve_denoiser_calls", "Denoiser calls (one step of every image in them)", ["phase"])
ACTIVE_IMAGES = Gauge("sdserve_active_images", "Images admitted to the step loop and not yet finished")
# For autoscaling (KEDA): the demand on this replica, in images, and what one denoiser call holds.
IMAGES_PENDING = Gauge("sdserve_images_pending", "Images of requests received and not yet answered: waiting for "
                       "admission plus in the step loop (a request for n images counts n until it ends)")
IMAGE_CAPACITY = Gauge("sdserve_image_capacity", "Images one denoiser call takes (--max_batch_images)")
IMAGES = Counter("sdserve_images_generated", "Images generated")
IMAGE_INPUT_IMAGES = Counter("sdserve_images_from_image", "Images generated from a request's start image, by mode",
                             ["mode"])  # img2img | inpaint
GENERATION_SECONDS = Histogram(
    "sdserve_generation_seconds", "Time from a request's admission to its last image decoded", buckets=_SECONDS
)
QUEUE_SECONDS = Histogram("sdserve_queue_wait_seconds", "Time a request waited in the queue before admission",
                          buckets=_SECONDS)
FIRST_STEP_SECONDS = Histogram("sdserve_time_to_first_step_seconds", "Time from a request's arrival to its first "
                               "denoising step", buckets=_SECONDS)
REQUEST_SECONDS = Histogram(
    "sdserve_request_seconds", "Time from request parsed to response encoded", ["protocol"], buckets=_SECONDS
)
REQUESTS = Counter("sdserve_requests", "Generation requests received", ["protocol"])
FAILURES = Counter("sdserve_request_failures", "Requests that failed, by reason", ["reason"])
OOM_RETRIES = Counter("sdserve_oom_retries", "Denoiser or VAE calls that ran out of memory and were retried in halves")
OPEN_STREAMS = Gauge("sdserve_open_streams", "OpenAI image streams (stream: true) open now")
FIRST_PARTIAL_SECONDS = Histogram("sdserve_time_to_first_partial_image_seconds", "Time from a streamed request "
                                  "parsed to its first partial image ready to send", buckets=_SECONDS)
LORA_LISTINGS = Counter("sdserve_lora_store_listings", "Listings of the LoRA adapter store (start-up, and a request "
                        "naming an adapter not yet known, rate-limited by --lora_relist_seconds)", ["result"])  # ok | error
LORA_DOWNLOADS = Counter("sdserve_lora_downloads", "LoRA adapters downloaded from a remote store on first use",
                         ["result"])  # ok | error
LORA_LOADS = Counter("sdserve_lora_loads", "LoRA adapters loaded into the model (at start-up, or on first use after a "
                     "listing or an eviction)", ["result"])  # ok | error
LORA_EVICTIONS = Counter("sdserve_lora_evictions", "LoRA adapters unloaded to stay within --max_loaded_adapters "
                         "(least recently used, never one an image in flight uses)")
LORA_RESIDENT = Gauge("sdserve_lora_resident", "LoRA adapters loaded into the model now")
ADAPTER_SETS_PER_CALL = Histogram("sdserve_adapter_sets_per_call", "Different LoRA adapter sets (none counts as one) "
                                  "among the images of one denoiser call", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
CONTROL_CALLS = Counter("sdserve_control_calls", "Control model calls: ControlNet calls (one per model per "
                        "denoiser call, for every row using it); T2I-Adapter and IP-Adapter image encodings (one "
                        "per request)",
                        ["kind"])  # controlnet | t2i-adapter | ip-adapter
CONTROL_ROWS = Counter("sdserve_control_rows", "Denoiser rows that took a control model's residuals, features or "
                       "image embeddings", ["kind"])
CONTROL_LISTINGS = Counter("sdserve_control_store_listings", "Listings of --control_dir (start-up, and a request "
                           "naming a control model not yet known)", ["result"])  # ok | error
CONTROL_LOADS = Counter("sdserve_control_loads", "Control models loaded on first use (and again after an eviction)",
                        ["result"])  # ok | error
CONTROL_EVICTIONS = Counter("sdserve_control_evictions", "Control models unloaded to stay within --max_loaded_controls "
                            "(least recently used)")
