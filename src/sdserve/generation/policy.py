"""The step policy: which active images share the next denoiser call. The whole policy is here.

* Images share a call when their group keys are equal (``ImageState.group_key``). What still
  splits a group, and why:
  - the denoiser (base or refiner): different weights, a different call;
  - the latent size: rows of one call are one tensor;
  - the prompt's length in tokens (77, or a multiple of 77 for a long or BREAK prompt in a
    weighted syntax): the text rows of one call are one tensor too, and padding a shorter prompt to
    a longer one would change its image; weighted prompts of 77 tokens share calls with plain ones;
  - an IP-Adapter given several reference images: a call's image tokens for one IP-Adapter are
    one tensor, so an image with k > 1 references for it shares calls with images of the same k
    for it only (one reference, the default, and no IP-Adapter share freely: see below);
  - a LoRA adapter set only peft's own path serves (DoRA and other peft variants, a bias on
    ``lora_B``): those adapters change the layer itself, not just add a low-rank term, so their
    images run in calls of their own set (``adapters/batched.py``).
  Everything else may differ within a call: steps, guidance, sampler, prompts, how far along the
  image is, its LoRA adapters (any set, several, none, each with its scales: every row gets
  its own adapters' deltas) and its controls. Controls need no key of their own: a ControlNet's
  residuals and a T2I-Adapter's features are added to the UNet's hidden states row by row, so a
  row without them gets zeros, which leave it as it is; a ControlNet runs as its own call before
  the UNet's, over just the rows that use it; an IP-Adapter's attention is added with a scale per
  row, 0 for the rows without it (``control.py``).
* Groups take turns, one call each, in round-robin order: no group waits for another to finish.
* Within a group at most ``max_images`` images go into one call (the memory bound; lowered for a
  group after it ran out of memory). When more are waiting, those with the fewest denoiser calls
  left go first, so a short request is not held up by long ones; an image left out ``patience``
  calls in a row goes before them (the longest waiting first), so a long one is never starved.
* With compiled denoisers, row counts are padded up to a few bucket sizes (powers of two up to
  the largest call), so that new shapes do not recompile while serving.
"""

from __future__ import annotations

from collections import deque

from .state import ImageState


def buckets(largest: int) -> list[int]:
    """Row counts a padded call may have: 1, 2, 4, ... below ``largest``, then ``largest``."""
    sizes, n = [], 1
    while n < largest:
        sizes.append(n)
        n *= 2
    return sizes + [largest]


def padded(rows: int, largest: int) -> int:
    return next(b for b in buckets(max(largest, rows)) if b >= rows)


class StepPolicy:
    def __init__(self, max_images: int, patience: int = 8):
        if max_images < 1 or patience < 1:
            raise ValueError("max_images and patience must be at least 1")
        self.max_images = max_images
        self.patience = patience
        self._turns: deque[tuple] = deque()  # group keys, the next to run first
        self._fits: dict[tuple, int] = {}  # group key -> most images that fitted after an OOM

    def choose(self, active: list[ImageState]) -> list[ImageState]:
        """The images of the next call: one group's, at most its limit (empty when none is active)."""
        groups: dict[tuple, list[ImageState]] = {}
        for image in active:
            groups.setdefault(image.group_key(), []).append(image)
        self._turns = deque(k for k in self._turns if k in groups)
        self._turns.extend(k for k in groups if k not in self._turns)
        self._fits = {k: v for k, v in self._fits.items() if k in groups}
        if not self._turns:
            return []
        key = self._turns[0]
        self._turns.rotate(-1)
        members = groups[key]
        limit = self.limit(key)
        if len(members) <= limit:
            chosen = members
        else:
            chosen = sorted(members, key=self._rank)[:limit]
        picked = set(map(id, chosen))
        for image in members:
            image.waited = 0 if id(image) in picked else image.waited + 1
        return sorted(chosen, key=lambda im: im.order)

    def _rank(self, image: ImageState) -> tuple:
        """Starving images first (the longest waiting first), then fewest calls left, then first admitted."""
        if image.waited >= self.patience:
            return 0, -image.waited, image.order
        return 1, image.remaining, image.order

    def limit(self, key: tuple) -> int:
        return min(self.max_images, self._fits.get(key, self.max_images))

    def ran_out_of_memory(self, key: tuple, fitted: int) -> None:
        """Calls of this group are capped at ``fitted`` images while it has images in flight."""
        self._fits[key] = max(1, min(fitted, self.limit(key)))
