"""``--ray_workers N``: the same training loop on N Ray Train workers (``TorchTrainer``), for a
RayJob on OpenShift AI or any Ray cluster. Ray Train starts the process group (NCCL on GPUs, Gloo on
CPUs) and sets RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR in each worker, which accelerate reads:
the loop runs as it does under torchrun, with rank 0 alone writing the caches, validation images
and the adapter.
"""

from __future__ import annotations

import os
from pathlib import Path

from .options import InputError, TrainOptions

# The main process may make class images while the others wait at the first collective call.
PROCESS_GROUP_TIMEOUT_S = 2 * 3600


def _worker(config: dict) -> None:
    import ray.train

    from .loop import train

    try:
        result = train(TrainOptions(**config))
    except InputError as exc:
        # the driver turns this back into a usage error (exit status 2)
        raise RuntimeError(f"{INPUT_ERROR}{exc}") from None
    ray.train.report(result or {})  # every worker reports once: Ray Train waits for all


INPUT_ERROR = "sdserve-train input error: "


def _input_error(exc: BaseException) -> str | None:
    """The InputError message a worker failed with, found in Ray's error text."""
    text = str(exc)
    if INPUT_ERROR not in text:
        return None
    return text.split(INPUT_ERROR, 1)[1].splitlines()[0].strip()


def train_with_ray(opts: TrainOptions) -> dict | None:
    """Run the loop on ``opts.ray_workers`` Ray Train workers; joins ``--ray_address`` (else
    RAY_ADDRESS, else starts a local Ray)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        local = opts.ray_address is None and not os.environ.get("RAY_ADDRESS")
        ray.init(address=opts.ray_address, include_dashboard=False if local else None, log_to_driver=True)
    work = opts.work_path.resolve()
    # workers may start in another directory: they get absolute local paths
    absolute = {
        key: str(Path(value).resolve())
        for key, value in (("model_dir", opts.model_dir), ("images", opts.images), ("output", opts.output))
        if "://" not in value
    }
    config = {**opts.to_dict(), **absolute, "work_dir": str(work), "ray_workers": 0}
    trainer = TorchTrainer(
        _worker,
        train_loop_config=config,
        torch_config=TorchConfig(timeout_s=PROCESS_GROUP_TIMEOUT_S),
        scaling_config=ScalingConfig(num_workers=opts.ray_workers, use_gpu=opts.ray_use_gpu),
        run_config=RunConfig(name=f"sdserve-train-{opts.name}", storage_path=str(work / "ray")),
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        message = _input_error(exc)
        if message is not None:
            raise InputError(message) from None
        raise
    return result.metrics or None
