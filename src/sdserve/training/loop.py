"""The training run of one process: accelerate for mixed precision and data parallelism (a plain
run, ``accelerate launch``, ``torchrun``, a PyTorchJob or a Ray Train worker: accelerate reads the
ranks from the environment), the LoRA optimisation steps, checkpoints, validation images, and the
adapter published at the end by the main process alone.

1. load the base model with the server's model store; 2. make class images and cache the latents
and text embeddings (main process; the others wait and receive them); 3. add the LoRA layers;
4. optimise, checkpointing and validating on the way; 5. publish the adapter.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from ..models import storage
from ..models.layout import ModelStoreError
from . import checkpoints, data, lora, model, output, processes
from .objective import Objective
from .options import InputError, TrainOptions, check_resolution, inspect_model
from .sampling import EngineImages

log = logging.getLogger("sdserve")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _optimizer(opts: TrainOptions, modules: dict[str, torch.nn.Module]):
    groups = [{"params": lora.trainable(module),
               "lr": opts.learning_rate if name == "unet" else (opts.text_encoder_lr or opts.learning_rate)}
              for name, module in modules.items()]
    if opts.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError:
            raise InputError("--use_8bit_adam needs bitsandbytes (CUDA): pip install 'sdserve[train-8bit]'") from None
        adam = bitsandbytes.optim.AdamW8bit
    else:
        adam = torch.optim.AdamW
    return adam(groups, betas=(0.9, 0.999), weight_decay=opts.adam_weight_decay, eps=1e-8)


def _local_model(opts: TrainOptions, accelerator) -> str:
    def download() -> str:
        try:
            return storage.local_path(opts.model_dir)
        except ModelStoreError as exc:
            raise InputError(f"--model_dir: {exc}") from None

    return processes.in_turn(accelerator, download)


def model_identity(model_dir: str) -> str:
    """The model, as a checkpoint records it: the location given, local paths made absolute."""
    return model_dir if storage.is_remote(model_dir) else str(Path(model_dir).resolve())


def _description(opts: TrainOptions, info, size: int) -> str:
    if opts.description:
        return opts.description
    what = f"'{opts.instance_prompt}'" + (f" with prior preservation ('{opts.class_prompt}')"
                                          if opts.prior_preservation else "")
    return (f"DreamBooth LoRA {opts.name} for {info.pipeline_class}: {what}; rank {opts.rank}, "
            f"{opts.max_train_steps} steps at {size}x{size}; made by sdserve train")


def train(opts: TrainOptions) -> dict | None:
    """Train and publish; returns (on the main process) what was done."""
    import diffusers
    import transformers
    from diffusers.optimization import get_scheduler

    accelerator = processes.make_accelerator(opts)
    main, device = accelerator.is_main_process, accelerator.device
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    for library in (diffusers, transformers):  # their loading bars and notes drown the training's own
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    work = opts.work_path
    if main:
        work.mkdir(parents=True, exist_ok=True)
    from accelerate.utils import set_seed

    set_seed(opts.seed)

    # 1. the base model, as the servers load it
    model_dir = _local_model(opts, accelerator)
    info = inspect_model(model_dir)
    size = check_resolution(opts.resolution, info.native_size)
    dtype = DTYPES[accelerator.mixed_precision]
    trained = model.load(model_dir, info.family, device, dtype)
    engine = EngineImages(trained.loaded) if main else None

    # 2. class images and cached tensors, made once by the main process
    tensors = data.share(lambda: data.build(opts, trained, model_dir, size, work, engine.generate),
                         main, accelerator.num_processes).to(device)

    # 3. LoRA layers
    names = lora.component_names(trained, opts.train_text_encoder)
    lora.add_adapters(trained, names, opts.rank, opts.lora_alpha, opts.lora_dropout)
    modules = {name: getattr(trained.pipe, name) for name in names}
    if opts.gradient_checkpointing:
        trained.unet.enable_gradient_checkpointing()
        for name in names[1:]:
            modules[name].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = _optimizer(opts, modules)
    world = accelerator.num_processes  # the prepared scheduler steps once per process
    lr_scheduler = get_scheduler(opts.lr_scheduler, optimizer, num_warmup_steps=opts.lr_warmup_steps * world,
                                 num_training_steps=opts.max_train_steps * world)
    prepared = accelerator.prepare(*modules.values(), optimizer, lr_scheduler)
    wrapped = dict(zip(names, prepared[: len(names)]))
    optimizer, lr_scheduler = prepared[len(names):]

    def unwrapped() -> dict[str, torch.nn.Module]:
        return {name: accelerator.unwrap_model(module) for name, module in wrapped.items()}

    checkpoints.register_hooks(accelerator, unwrapped)
    settings = {"rank": opts.rank, "alpha": opts.lora_alpha, "train_text_encoder": opts.train_text_encoder,
                "resolution": size, "model": model_identity(opts.model_dir), "use_8bit_adam": opts.use_8bit_adam}
    step = 0
    found = checkpoints.latest(work) if opts.resume else None
    if found is not None:
        step = checkpoints.read(found, settings)
        accelerator.load_state(str(found))
        log.info("resuming from %s (step %d)", found, step)
    elif opts.resume:
        log.info("--resume: no checkpoint in %s yet: starting from step 0", work / "checkpoints")
    if main:
        checkpoints.start(work, step)
        (work / "config.json").write_text(json.dumps({**opts.to_dict(), "resolution": size}, indent=1))

    objective = Objective(trained, tensors, opts.train_batch_size, opts.seed, accelerator.process_index,
                          world, opts.prior_loss_weight, dtype)
    validation_prompt = opts.validation_prompt or opts.instance_prompt

    def save_checkpoint(at: int) -> None:
        path = checkpoints.folder(work, at)
        accelerator.save_state(str(path))
        accelerator.wait_for_everyone()  # every process's RNG state is in before it counts
        if main:
            checkpoints.mark(path, at, settings)
            checkpoints.prune(work, opts.checkpoints_total_limit)

    def validate(at: int) -> None:
        def make() -> None:
            image = engine.generate(validation_prompt, size, opts.validation_inference_steps, opts.seed)[0]
            path = work / "validation" / f"step-{at:06d}.png"
            path.parent.mkdir(exist_ok=True)
            image.save(path)
            log.info("validation image: %s", path)

        processes.together(accelerator, main, make)

    # 4. optimise
    from tqdm.auto import tqdm

    encoders = [wrapped[name] for name in names[1:]] or None
    accumulate = opts.gradient_accumulation_steps
    bar = tqdm(total=opts.max_train_steps, initial=step, desc="training", unit="step", disable=not main)
    started, loss_value, first_step = time.perf_counter(), math.nan, step
    history = (work / checkpoints.LOSS_LOG).open("a") if main else None
    for module in wrapped.values():
        module.train()
    while step < opts.max_train_steps:
        losses = []
        for micro in range(step * accumulate, (step + 1) * accumulate):
            with accelerator.accumulate(*wrapped.values()):
                loss = objective.loss(micro, wrapped["unet"], encoders)
                accelerator.backward(loss)
                if accelerator.sync_gradients and opts.max_grad_norm > 0:
                    params = [p for module in wrapped.values() for p in lora.trainable(module)]
                    accelerator.clip_grad_norm_(params, opts.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        step += 1
        loss_value = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        if not math.isfinite(loss_value):
            raise RuntimeError(f"the loss is {loss_value} at step {step}: try --mixed_precision bf16 or no, "
                               "or a lower --learning_rate")
        lr = lr_scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
        if history is not None:
            history.write(json.dumps({"step": step, "loss": loss_value, "lr": lr,
                                      "seconds": round(time.perf_counter() - started, 3)}) + "\n")
            history.flush()
        if opts.checkpointing_steps and (step % opts.checkpointing_steps == 0 or step == opts.max_train_steps):
            save_checkpoint(step)
        if opts.validation_steps and (step % opts.validation_steps == 0 or step == opts.max_train_steps):
            validate(step)
    bar.close()
    if history is not None:
        history.close()

    # 5. publish, from the main process only
    def publish() -> dict:
        weights = lora.save_diffusers(trained, unwrapped(), work / "adapter")
        recipe = output.recipe(opts.instance_prompt, _description(opts, info, size), opts.scale, opts.recipe_steps,
                               trained.loaded.capabilities.default_guidance_scale, size)
        where = output.publish(weights, recipe, opts.output, opts.name)
        seconds = time.perf_counter() - started
        log.info("adapter %s written to %s (%d steps, %.1f s)", opts.name, where, step, seconds)
        return {"adapter": where, "step": step, "loss": loss_value, "steps_run": step - first_step,
                "seconds": round(seconds, 2), "processes": world, "resolution": size}

    accelerator.wait_for_everyone()
    result = processes.together(accelerator, main, publish)
    accelerator.end_training()
    return result
