"""The built-in control preprocessor: Canny edges, as AUTOMATIC1111's ControlNet extension and
diffusers' ControlNet examples make them (OpenCV's ``Canny``, white edges on black, three channels).
Other preprocessors (depth, pose, line art...) come from ``controlnet_aux``: run it on the client
and send its output as the control image."""

from __future__ import annotations

import numpy as np
from PIL import Image


def canny_edges(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """The RGB edge map of ``image`` with hysteresis thresholds ``low`` and ``high``."""
    import cv2  # imported on first use: servers that never preprocess do not load OpenCV

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))
