"""Generation: sdserve's own denoising loop, scheduled one step at a time across requests.

    admission.py  the bounded queue and the job a request becomes
    engine.py     the worker thread that owns the model; submit / generate; lifecycle
    loop.py       one iteration: choose, denoise, advance phases, decode, answer
    policy.py     which images share the next denoiser call (the whole policy)
    denoise.py    one denoiser call over rows of many images, then each image's scheduler step
    decode.py     VAE decode of finished images, batched
    backend.py    the loaded model's phases and adapters; admission of new images
    state.py      per-image state (plain data)
    image_start.py  img2img and inpainting: start latents and the kept region
    preview.py    cheap previews of images in progress (latent-to-RGB maps, tiny VAE)
    faults.py     fault injection for tests (out of memory, a hung step)
    families/     per model family: prompt encoding, schedules, conditioning, denoiser, decoding

May import ``errors``, ``metrics``, ``models``, ``request`` and ``adapters``; never the protocols
or the server (they call the engine, not the other way round).
"""

from .admission import Job, Progress
from .backend import ModelBackend
from .engine import Engine, EngineSettings

__all__ = ["Engine", "EngineSettings", "Job", "ModelBackend", "Progress"]
