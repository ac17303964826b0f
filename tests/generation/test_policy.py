"""The step policy alone: which images share the next denoiser call."""

from types import SimpleNamespace

import pytest
import torch

from sdserve.generation.policy import StepPolicy, buckets, padded
from sdserve.generation.state import ImageState, Rows, Schedule

BASE = SimpleNamespace(name="base", uses_adapters=True)
REFINER = SimpleNamespace(name="refiner", uses_adapters=False)


def image(order, steps=10, size=32, phase=BASE, loras=(), exclusive=False):
    """``exclusive``: adapters only peft's own path serves (DoRA), as the backend marks them."""
    job = SimpleNamespace(request=SimpleNamespace(loras=loras))
    schedule = Schedule(phase, Rows({}), None, torch.zeros(steps), [0.0] * steps, {})
    state = ImageState(job, 0, order, None, [schedule], steps, order, own_calls=loras if exclusive else ())
    state.latents = torch.zeros(1, 4, size, size)
    return state


def run(policy, active, calls):
    """Step the policy's choices ``calls`` times; finished images leave. Returns the choices."""
    seen = []
    for _ in range(calls):
        chosen = policy.choose(active)
        seen.append([im.order for im in chosen])
        for im in chosen:
            im.steps_done += 1
        active[:] = [im for im in active if im.remaining > 0]
    return seen


def test_compatible_images_share_a_call_whatever_their_progress():
    active = [image(0, steps=60), image(1, steps=4)]
    active[0].steps_done = 30
    assert [im.order for im in StepPolicy(4).choose(active)] == [0, 1]


def test_groups_take_turns_step_by_step():
    active = [image(0), image(1, size=48), image(2, loras=(("trex", 1.0),)), image(3, phase=REFINER),
              image(4, loras=(("dora", 1.0),), exclusive=True), image(5, loras=(("pixel", 0.5), ("trex", 1.0)))]
    choices = run(StepPolicy(8), active, 8)
    # different adapter sets share a call; only an exclusive set gets calls of its own
    assert choices[:4] == [[0, 2, 5], [1], [3], [4]] and choices[4:] == choices[:4]


def test_fewest_steps_left_go_first_when_a_call_is_full():
    active = [image(0, steps=50), image(1, steps=50), image(2, steps=3), image(3, steps=5)]
    choices = run(StepPolicy(2, patience=100), active, 5)
    assert choices[0] == [2, 3] and choices[2] == [2, 3]  # the short ones finish first
    assert choices[3] == [0, 3] and choices[4] == [0, 3]


def long_image_steps(patience: int, calls: int = 40) -> int:
    """Calls that step a long image while one-step requests arrive as fast as calls run (one image per call)."""
    long = image(0, steps=1000)
    policy = StepPolicy(1, patience=patience)
    active = [long]
    stepped = 0
    for i in range(calls):
        active.append(image(i + 1, steps=1))
        chosen = policy.choose(active)
        for im in chosen:
            im.steps_done += 1
        stepped += long in chosen
        active[:] = [im for im in active if im.remaining > 0]
    return stepped


def test_no_image_starves():
    assert long_image_steps(patience=10**6) == 0  # fewest-steps-first alone would starve it
    assert long_image_steps(patience=3) >= 6  # waiting counts: it keeps a share of the calls


def test_out_of_memory_lowers_a_groups_limit_while_it_is_active():
    policy = StepPolicy(8)
    active = [image(i) for i in range(6)]
    key = active[0].group_key()
    policy.ran_out_of_memory(key, 3)
    assert len(policy.choose(active)) == 3 and policy.limit(key) == 3
    assert len(policy.choose([image(9, size=48)])) == 1 and policy.limit(key) == 8  # forgotten once gone


def test_row_buckets():
    assert buckets(8) == [1, 2, 4, 8] and buckets(6) == [1, 2, 4, 6] and buckets(1) == [1]
    assert [padded(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError):
        StepPolicy(0)
