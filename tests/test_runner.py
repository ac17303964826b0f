"""Generation through the real pipelines (tiny weights): seeds, batching, schedulers, refiner modes."""

import numpy as np
import pytest
import torch

from sdserve import model_store
from sdserve.request import Limits, RequestParser
from sdserve.runner import PipelineRunner
from sdserve.schedulers import SCHEDULERS

# Batched kernels may round differently from single ones; images must stay within this (of 255).
BATCH_TOLERANCE = 2


@pytest.fixture(scope="module")
def sdxl(models):
    loaded = model_store.load(model_store.discover(models["sdxl-refiner"]), torch.device("cpu"), torch.float32)
    return RequestParser(Limits(), loaded.capabilities), PipelineRunner(loaded, max_batch_images=8)


def max_diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_same_seed_same_image_other_seed_other_image(sdxl):
    parser, runner = sdxl
    req = parser.parse({"prompt": "a dog", "seed": 42, "num_inference_steps": 4})
    first, again = runner.run([req])[0][0], runner.run([req])[0][0]
    assert first.shape == (256, 256, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    other = runner.run([parser.parse({"prompt": "a dog", "seed": 43, "num_inference_steps": 4})])[0][0]
    assert max_diff(first, other) > 50


@pytest.mark.parametrize("scheduler", [None, "Euler a", "DPM++ 2M SDE Karras", "DPM++ SDE Karras"])
def test_batched_equals_unbatched(sdxl, scheduler):
    """Each image has its own generator (and Brownian noise seed): a batch changes nothing."""
    parser, runner = sdxl
    common = {"num_inference_steps": 4, "negative_prompt": "blurry", "scheduler": scheduler}
    a = parser.parse({"prompt": "a dog", "seed": 1, "num_images": 2, **common})
    b = parser.parse({"prompt": "a cat", "seed": 7, **common})
    together = runner.run([a, b])
    alone_a, alone_b = runner.run([a])[0], runner.run([b])[0]
    assert len(together[0]) == 2 and len(together[1]) == 1
    assert max_diff(together[0][0], alone_a[0]) <= BATCH_TOLERANCE
    assert max_diff(together[0][1], alone_a[1]) <= BATCH_TOLERANCE
    assert max_diff(together[1][0], alone_b[0]) <= BATCH_TOLERANCE
    # image i of a request is the image a one-image request with seed + i makes
    single = runner.run([parser.parse({"prompt": "a dog", "seed": 2, **common})])[0][0]
    assert max_diff(together[0][1], single) <= BATCH_TOLERANCE


def test_large_requests_are_split_into_calls_of_max_batch_images(models):
    loaded = model_store.load(model_store.discover(models["sdxl"]), torch.device("cpu"), torch.float32)
    parser = RequestParser(Limits(), loaded.capabilities)
    req = parser.parse({"prompt": "x", "seed": 3, "num_images": 5, "num_inference_steps": 2})
    calls = []
    original = loaded.base.__class__.__call__

    def counting(self, *args, **kwargs):
        calls.append(len(kwargs["prompt"]))
        return original(self, *args, **kwargs)

    loaded.base.__class__.__call__ = counting
    try:
        images = PipelineRunner(loaded, max_batch_images=2).run([req])[0]
    finally:
        loaded.base.__class__.__call__ = original
    assert calls == [2, 2, 1] and len(images) == 5
    reference = PipelineRunner(loaded, max_batch_images=8).run([req])[0]
    assert all(max_diff(x, y) <= BATCH_TOLERANCE for x, y in zip(images, reference))


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_runs_and_is_deterministic(sdxl, name):
    parser, runner = sdxl
    req = parser.parse({"prompt": "a dog", "seed": 5, "num_inference_steps": 4, "scheduler": name, "refiner": "none"})
    first, again = runner.run([req])[0][0], runner.run([req])[0][0]
    assert first.std() > 5 and np.array_equal(first, again)


def test_refiner_modes_give_different_images(sdxl, models):
    parser, runner = sdxl
    common = {"prompt": "a dog", "seed": 9, "num_inference_steps": 10}
    none, ensemble, refine = (
        runner.run([parser.parse({**common, "refiner": mode})])[0][0] for mode in ("none", "ensemble", "refine")
    )
    # (random refiner weights change little, but clearly more than batching noise)
    for a, b in [(none, ensemble), (none, refine), (ensemble, refine)]:
        assert max_diff(a, b) > 2 * BATCH_TOLERANCE
    early = runner.run([parser.parse({**common, "high_noise_frac": 0.5})])[0][0]
    assert max_diff(early, ensemble) > 2 * BATCH_TOLERANCE
    # refiner "none" is exactly the base model alone: same as the base-only folder (same weights)
    base_only = model_store.load(model_store.discover(models["sdxl"]), torch.device("cpu"), torch.float32)
    plain = PipelineRunner(base_only, 8).run([RequestParser(Limits(), base_only.capabilities).parse(common)])[0][0]
    assert np.array_equal(plain, none)


def test_micro_conditioning_changes_the_image(sdxl):
    parser, runner = sdxl
    common = {"prompt": "a dog", "seed": 9, "num_inference_steps": 4, "refiner": "none"}
    plain = runner.run([parser.parse(common)])[0][0]
    cropped = runner.run([parser.parse({**common, "crops_coords_top_left": [256, 0]})])[0][0]
    sized = runner.run([parser.parse({**common, "original_size": [512, 512], "target_size": [512, 512]})])[0][0]
    assert max_diff(plain, cropped) > 0 and max_diff(plain, sized) > 0


def test_sd_pipeline_generates_at_its_own_size(models):
    loaded = model_store.load(model_store.discover(models["sd"]), torch.device("cpu"), torch.float32)
    parser = RequestParser(Limits(), loaded.capabilities)
    image = PipelineRunner(loaded, 4).run([parser.parse({"prompt": "x", "num_inference_steps": 2, "width": 320})])[0][0]
    assert image.shape == (256, 320, 3)


def test_out_of_memory_retries_in_halves_then_names_the_size(models):
    from sdserve.errors import ImageTooLarge
    from sdserve.faults import Faults

    loaded = model_store.load(model_store.discover(models["sdxl"]), torch.device("cpu"), torch.float32)
    parser = RequestParser(Limits(), loaded.capabilities)
    # calls of more than two 256x256 images "run out of memory"
    runner = PipelineRunner(loaded, max_batch_images=8, faults=Faults(oom_pixels=2 * 256 * 256))
    req = parser.parse({"prompt": "x", "seed": 3, "num_images": 5, "num_inference_steps": 2})
    images = runner.run([req])[0]
    reference = PipelineRunner(loaded, max_batch_images=8, faults=Faults()).run([req])[0]
    assert len(images) == 5 and all(max_diff(a, b) <= BATCH_TOLERANCE for a, b in zip(images, reference))
    big = parser.parse({"prompt": "x", "width": 1024, "height": 512, "num_inference_steps": 2})
    with pytest.raises(ImageTooLarge, match="one 1024x512 image"):
        runner.run([big])


def test_should_stop_interrupts_between_steps(sdxl):
    from sdserve.errors import Interrupted

    parser, runner = sdxl
    polls = []

    def stop_after_three():
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(Interrupted):
        runner.run([parser.parse({"prompt": "x", "num_inference_steps": 50})], stop_after_three)
    assert len(polls) == 3


def test_counting_tokens_on_another_thread_does_not_disturb_generation(sdxl):
    """Fast tokenizers keep truncation/padding state per object: counting must use copies."""
    import threading

    from sdserve.prompts import counting_tokenizers, prompt_warnings

    parser, runner = sdxl
    tokenizers = counting_tokenizers(runner.model.base)
    long_request = parser.parse({"prompt": "word " * 200})
    stop = threading.Event()

    def count_forever():
        while not stop.is_set():
            assert prompt_warnings(tokenizers, long_request)

    counter = threading.Thread(target=count_forever)
    counter.start()
    try:
        for seed in range(6):
            runner.run([parser.parse({"prompt": "a short prompt", "num_inference_steps": 1, "refiner": "none", "seed": seed})])
    finally:
        stop.set()
        counter.join()


@pytest.fixture(scope="module")
def with_loras(models):
    from sdserve.adapters import Adapters

    loaded = model_store.load(model_store.discover(models["sdxl-loras"]), torch.device("cpu"), torch.float32)
    adapters = Adapters(models["sdxl-loras"] / "loras", rescan_seconds=0)
    adapters.load_all(loaded.base)
    parser = RequestParser(Limits(), loaded.capabilities, adapters)
    return parser, PipelineRunner(loaded, 8, adapters=adapters), adapters


def test_loras_change_the_image_and_no_lora_is_exactly_the_base(with_loras, models):
    parser, runner, _ = with_loras
    common = {"prompt": "a dinosaur", "seed": 4, "num_inference_steps": 3}
    plain = runner.run([parser.parse(common)])[0][0]
    trex = runner.run([parser.parse({**common, "loras": [{"name": "trex", "scale": 1.0}]})])[0][0]
    both = runner.run([parser.parse({**common, "loras": ["trex", {"name": "pixel", "scale": 0.5}]})])[0][0]
    after = runner.run([parser.parse(common)])[0][0]
    assert max_diff(plain, trex) > 2 * BATCH_TOLERANCE and max_diff(trex, both) > 2 * BATCH_TOLERANCE
    assert np.array_equal(plain, after)  # nothing left over from the LoRA requests
    # and equal to the same base weights served with no adapters loaded at all
    no_adapters = model_store.load(model_store.discover(models["sdxl"]), torch.device("cpu"), torch.float32)
    reference = PipelineRunner(no_adapters, 8).run([RequestParser(Limits(), no_adapters.capabilities).parse(common)])[0][0]
    assert np.array_equal(plain, reference)


def test_a_new_adapter_folder_is_found_and_loaded_on_first_use(with_loras):
    import shutil

    parser, runner, adapters = with_loras
    assert not adapters.exists("fresh")
    shutil.copytree(adapters.lora_dir / "trex", adapters.lora_dir / "fresh")
    try:
        request = parser.parse({"prompt": "a dinosaur", "seed": 4, "num_inference_steps": 3, "loras": ["fresh"]})
        fresh = runner.run([request])[0][0]
        trex = runner.run([parser.parse({"prompt": "a dinosaur", "seed": 4, "num_inference_steps": 3, "loras": ["trex"]})])[0][0]
        assert np.array_equal(fresh, trex) and "fresh" in adapters.names()
    finally:
        shutil.rmtree(adapters.lora_dir / "fresh")


def test_sd3_generates_deterministically_and_batches(models):
    loaded = model_store.load(model_store.discover(models["sd3"]), torch.device("cpu"), torch.float32)
    parser = RequestParser(Limits(), loaded.capabilities)
    runner = PipelineRunner(loaded, 8)
    a = parser.parse({"prompt": "a dog", "seed": 2, "num_inference_steps": 3, "negative_prompt": "cat"})
    b = parser.parse({"prompt": "a cat", "seed": 3, "num_inference_steps": 3, "negative_prompt": "dog", "prompt_3": "t5 only"})
    together = runner.run([a, b])
    assert together[0][0].shape == (256, 256, 3)
    assert max_diff(together[0][0], runner.run([a])[0][0]) <= BATCH_TOLERANCE
    assert max_diff(together[1][0], runner.run([b])[0][0]) <= BATCH_TOLERANCE
    heun = runner.run([parser.parse({"prompt": "a dog", "seed": 2, "num_inference_steps": 3, "scheduler": "Heun"})])[0][0]
    assert heun.std() > 5 and max_diff(heun, together[0][0]) > 0


def test_vae_tiling_decodes_large_images(models):
    from sdserve.model_store import LoadOptions

    loaded = model_store.load(model_store.discover(models["sd"]), torch.device("cpu"), torch.float32,
                              options=LoadOptions(vae_tiling=True, vae_slicing=True))
    assert loaded.base.vae.use_tiling and loaded.base.vae.use_slicing
    parser = RequestParser(Limits(), loaded.capabilities)
    images = PipelineRunner(loaded, 4).run([parser.parse({"prompt": "x", "width": 1024, "height": 512, "num_images": 2,
                                                          "num_inference_steps": 2})])[0]
    assert [i.shape for i in images] == [(512, 1024, 3)] * 2 and images[0].std() > 5
