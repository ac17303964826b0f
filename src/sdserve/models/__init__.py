"""The model store: finding a model under ``--model_dir``, downloading remote locations, loading
the pipelines, and what they can do.

    layout.py        the layouts understood (diffusers folder, base/ + refiner/, single file); ModelStoreError
    loading.py       loading the base pipeline and the refiner onto the device (LoadedModel)
    capabilities.py  what a loaded model supports and its defaults (what requests are checked against)
    storage.py       remote locations (s3://, gs://, hf://, https://) with KServe's storage code
    schedulers.py    the sampler names a request may use, and building one scheduler per image
    optimize.py      the speed-up flags (fused QKV, channels_last, torch.compile)

May import: sdserve.errors and sdserve.metrics only; nothing else of sdserve (everything else
builds on the model store).
"""
