"""The previewer a loaded model's streamed requests get for their partial images (never the
model's VAE): the ``--preview_vae`` tiny VAE, else the family's linear latent-to-RGB map."""

from __future__ import annotations

import logging

from ..generation.preview import Previewer, PreviewError
from ..models import storage
from ..models.layout import ModelStoreError
from ..models.loading import LoadedModel

log = logging.getLogger("sdserve")


def model_previewer(loaded: LoadedModel, preview_vae: str | None,
                    download_dir: str | None) -> tuple[Previewer | None, str | None]:
    """(the previewer, None), or (None, why this model has no previews). Built with the model on
    the worker. A bad ``--preview_vae`` stops start-up (ModelStoreError); a model with no linear
    map just has no previews."""
    base = loaded.base
    vae = getattr(base, "vae", None)
    if vae is None:
        if preview_vae:
            raise ModelStoreError(f"--preview_vae {preview_vae}: this model has no VAE to preview")
        return None, "it has no VAE"
    tiny_vae_dir = storage.local_path(preview_vae, download_dir) if preview_vae else None
    try:
        previewer = Previewer(loaded.capabilities.family, vae.config.latent_channels,
                              getattr(base, "vae_scale_factor", 8), tiny_vae_dir=tiny_vae_dir,
                              device=loaded.device, dtype=loaded.dtype)
    except PreviewError as exc:
        if preview_vae:
            message = str(exc)
            if tiny_vae_dir != preview_vae:  # downloaded: name the location as given
                message = message.replace(tiny_vae_dir, f"{preview_vae} ({tiny_vae_dir})", 1)
            raise ModelStoreError(message) from None
        log.info("no partial images for this model: %s", exc)
        return None, str(exc)
    log.info("partial images: %s", f"tiny VAE {preview_vae}" if preview_vae else "linear latent-to-RGB map")
    return previewer, None
