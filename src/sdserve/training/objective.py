"""One micro-batch and its loss: which images, which noise, which timesteps, and the denoising
objective (with prior preservation, the class images' loss weighted in).

Everything random in a micro-batch is drawn from generators seeded by (seed, micro-step, process),
never from global state: a resumed run draws exactly what an uninterrupted one would have, and
each process takes its own slice of every epoch's shuffled order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import TrainingData
from .model import TrainModel

MAX_SEED = 2**63 - 1


@functools.lru_cache(maxsize=64)
def _order(count: int, seed: int, epoch: int, salt: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 31 + salt) % MAX_SEED)
    return tuple(torch.randperm(count, generator=generator).tolist())


@dataclass
class Objective:
    model: TrainModel
    data: TrainingData
    batch_size: int
    seed: int
    process: int
    processes: int
    prior_loss_weight: float
    dtype: torch.dtype

    def __post_init__(self) -> None:
        from ..generation import ModelBackend

        self.noise_scheduler = self.model.noise_scheduler()
        self.timesteps = self.noise_scheduler.config.num_train_timesteps
        self.prediction = self.noise_scheduler.config.prediction_type
        self.phase = ModelBackend(self.model.loaded).base  # scales latents as generation unscales them
        self.device = self.model.loaded.device

    def rows(self, micro_step: int) -> list[int]:
        """Rows of the data for this process's micro-batch: instance images, then as many class
        images when prior preservation is on."""
        def pick(j: int, count: int, salt: int) -> int:
            drawn = (micro_step * self.processes + self.process) * self.batch_size + j
            epoch, position = divmod(drawn, count)
            return _order(count, self.seed, epoch, salt)[position]

        rows = [pick(j, self.data.instances, 0) for j in range(self.batch_size)]
        if self.data.classes:
            rows += [self.data.instances + pick(j, self.data.classes, 1) for j in range(self.batch_size)]
        return rows

    def loss(self, micro_step: int, unet, text_encoders: list | None = None) -> torch.Tensor:
        """The loss of one micro-batch; ``text_encoders`` (the wrapped, trained ones) encode the
        prompts when their embeddings are not cached."""
        data, device = self.data, self.device
        rows = torch.tensor(self.rows(micro_step), device=device)
        seed = ((self.seed * 1_000_003 + micro_step) * 1_009 + self.process) % MAX_SEED
        generator = torch.Generator().manual_seed(seed)
        mean, std = data.latent_mean[rows], data.latent_std[rows]
        sample = mean + std * torch.randn(mean.shape, generator=generator).to(device)
        latents = self.phase.scale_latents(sample)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t = torch.randint(0, self.timesteps, (len(rows),), generator=generator).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)

        prompts = data.prompt_index[rows]
        if data.embeds is not None:
            embeds, pooled = data.embeds[prompts], data.pooled[prompts] if data.pooled is not None else None
        else:
            ids = self.model.tokenize([data.prompts[i] for i in prompts.tolist()])
            embeds, pooled = self.model.encode(ids, text_encoders)
        time_ids = data.time_ids[rows].to(self.dtype) if data.time_ids is not None else None
        kwargs = self.model.unet_kwargs(pooled.to(self.dtype) if pooled is not None else None, time_ids)
        prediction = unet(noisy.to(self.dtype), t, encoder_hidden_states=embeds.to(self.dtype), **kwargs).sample

        if self.prediction == "epsilon":
            target = noise
        elif self.prediction == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:  # "sample"
            target = latents
        if not data.classes:
            return F.mse_loss(prediction.float(), target.float())
        b = self.batch_size
        instance = F.mse_loss(prediction[:b].float(), target[:b].float())
        return instance + self.prior_loss_weight * F.mse_loss(prediction[b:].float(), target[b:].float())
