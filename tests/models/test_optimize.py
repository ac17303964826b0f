"""Speed-ups keep the images: each optimisation against the plain diffusers path, same seeds."""

import numpy as np
import pytest

from helpers.oracle import LocalEngine
from sdserve.models.optimize import Optimizations, parse_sizes

# Reordered float maths (fused matmuls, NHWC convolutions, inductor's kernels) may move a pixel by
# a level or two out of 255; anything more is a real change.
TOLERANCE = 2


def images(models, opts: Optimizations | None, kind="sdxl-refiner"):
    """Two requests in flight together through the step loop: one with guidance (two rows) and one
    without (one row); compiled, the three rows are padded to four."""
    engine = LocalEngine(models[kind], max_batch_images=4, optimizations=opts)
    try:
        values = [{"prompt": "a lighthouse", "seed": 1, "num_inference_steps": 4},
                  {"prompt": "a lighthouse", "seed": 2, "num_inference_steps": 4, "guidance_scale": 1.0}]
        return [img for job in engine.submit(*values) for img in job.future.result(600).images]
    finally:
        engine.close()


@pytest.fixture(scope="module")
def plain(models):
    return images(models, None)


@pytest.mark.parametrize("opts", [
    Optimizations(fuse_qkv=True),
    Optimizations(channels_last=True),
    Optimizations(fuse_qkv=True, channels_last=True, compile="all"),
], ids=["fuse_qkv", "channels_last", "fuse+channels_last+compile"])
@pytest.mark.slow
def test_optimised_images_stay_within_tolerance(models, plain, opts):
    optimised = images(models, opts)
    diffs = [int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(plain, optimised)]
    assert max(diffs) <= TOLERANCE, diffs


@pytest.mark.slow
def test_sd3_transformer_fuses_and_compiles(models):
    plain = images(models, None, "sd3")
    optimised = images(models, Optimizations(fuse_qkv=True, compile="denoiser"), "sd3")
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(plain, optimised)) <= TOLERANCE


def test_settings_are_checked():
    assert parse_sizes("1024x1024, 768x1344") == ((1024, 1024), (768, 1344))
    with pytest.raises(ValueError, match="sizes are WIDTHxHEIGHT"):
        parse_sizes("1024")
    with pytest.raises(ValueError, match="compile must be one of none, denoiser, all"):
        Optimizations(compile="everything")


@pytest.mark.slow
def test_server_warms_up_before_it_is_ready(models, start_server):
    server = start_server("--model_dir", str(models["sdxl"]), "--fuse_qkv", "--channels_last", "--warmup", "128x128,64x96",
                          model_name="fast")
    log = server.log()
    assert "optimisations: fused QKV, channels_last" in log
    for rows in (1, 2, 4, 8):  # every padded row count of --max_batch_images 4
        assert f"warmed up 128x128, {rows} denoiser row(s)" in log
    assert log.index("warmed up 64x96, 8 denoiser row(s)") < log.index("Uvicorn running")
    r = server.predict({"instances": [{"prompt": "x", "width": 128, "height": 128, "num_inference_steps": 2}]})
    assert r.status_code == 200


@pytest.mark.slow
def test_bad_warmup_size_fails_start_up(models, start_server):
    server = start_server("--model_dir", str(models["sdxl"]), "--warmup", "100x100", wait=False)
    assert server.proc.wait(120) == 2
    assert "cannot start: --warmup: width: must be a multiple of 8" in server.log()
