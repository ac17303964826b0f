"""``stream: true`` on the OpenAI Images API against a real server, read by the real ``openai`` SDK
(sync and async) and by raw httpx: event order, types and fields as the SDK declares them, final
images byte for byte those of the same request unstreamed, errors before the stream (a 400) and in
it (an error event), sdserve's progress events, and a client that leaves stopping its images. Also
the OpenAI fields that are checked even where they have no effect (quality with steps given)."""

import asyncio
import base64
import io
import json
import re
import time

import httpx
import pytest
from PIL import Image

from helpers.images import decode_png, make_image, make_mask
from helpers.openai_stream import FAST, check_image_events, counter, gauge, png_file, rgba_mask, url, wait_for
from sdserve.cli.stream_client import sse_events

MAX_STEPS = 2000  # a request that would run for a long time unless it is stopped
TIMED = 20  # steps of it timed, to know how long the rest would take
OOM_PIXELS = 2 * 128 * 128  # injected: larger denoiser calls run "out of memory"
IMAGE, MASK = make_image(128, 128), make_mask(128, 128)


@pytest.fixture(scope="module")
def server(models, start_server):
    # One image in the step loop at a time, so a second request waits in the queue; a denoiser call
    # over OOM_PIXELS fails as out of memory.
    return start_server("--model_dir", str(models["sdxl"]), "--max_steps", str(MAX_STEPS), "--max_active_images", "1",
                        env={"SDSERVE_FAULT_OOM_PIXELS": str(OOM_PIXELS)})


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/openai/v1", api_key="not-checked", max_retries=0, timeout=120)


def test_generations_stream_partials_then_the_same_final_images(client):
    stream = client.images.generate(prompt="a lighthouse", n=2, size="128x128", stream=True, partial_images=2,
                                    extra_body=FAST)
    events = list(stream)
    completed = check_image_events(events, "image_generation", n=2, partials=2)
    assert all(e.quality == "auto" for e in events)
    plain = client.images.generate(prompt="a lighthouse", n=2, size="128x128", extra_body=FAST)
    for i in range(2):  # the final image is byte for byte the unstreamed one, PNG metadata included
        assert completed[i].b64_json == plain.data[i].b64_json
    # no partial images asked: only the completed events; quality is echoed
    only = list(client.images.generate(prompt="a lighthouse", size="128x128", stream=True, quality="low",
                                       output_format="webp", extra_body={**FAST, "num_inference_steps": 4}))
    assert [e.type for e in only] == ["image_generation.completed"] and only[0].quality == "low"
    assert only[0].output_format == "webp"
    assert Image.open(io.BytesIO(base64.b64decode(only[0].b64_json))).format == "WEBP"


def test_edits_stream_with_the_sdk(client):
    kwargs = {"image": png_file(IMAGE), "mask": png_file(rgba_mask(MASK), "mask.png"), "prompt": "a fox",
              "size": "128x128", "n": 2, "extra_body": FAST}
    events = list(client.images.edit(**kwargs, stream=True, partial_images=2))
    completed = check_image_events(events, "image_edit", n=2, partials=2)
    assert all(c.usage.input_tokens_details.image_tokens == 2 for c in completed.values())  # image and mask
    plain = client.images.edit(**kwargs)
    assert [completed[i].b64_json for i in range(2)] == [d.b64_json for d in plain.data]


def test_async_client_streams_generations_and_edits(server):
    from openai import AsyncOpenAI

    async def run():
        async with AsyncOpenAI(base_url=f"{server.url}/openai/v1", api_key="k", max_retries=0, timeout=120) as aclient:
            generated = [e async for e in await aclient.images.generate(
                prompt="a lighthouse", size="128x128", stream=True, partial_images=3, extra_body=FAST)]
            edited = [e async for e in await aclient.images.edit(
                image=png_file(IMAGE), prompt="a fox", size="128x128", stream=True, partial_images=1,
                output_format="jpeg", extra_body=FAST)]
            plain = await aclient.images.generate(prompt="a lighthouse", size="128x128", extra_body=FAST)
            return generated, edited, plain

    generated, edited, plain = asyncio.run(run())
    assert check_image_events(generated, "image_generation", n=1, partials=3)[0].b64_json == plain.data[0].b64_json
    check_image_events(edited, "image_edit", n=1, partials=1, output_format="jpeg")


def test_progress_events_over_raw_http(server):
    body = {"prompt": "a lighthouse", "size": "128x128", "stream": True, "stream_progress": True, "partial_images": 1,
            **FAST}
    with httpx.stream("POST", url(server), json=body, headers={"x-request-id": "s-1"}, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"] == "s-1"
        events = list(sse_events(response.iter_lines()))
    assert all(event == data["type"] for event, data in events)
    progress = [d for e, d in events if e == "sdserve.progress"]
    queued = [d for d in progress if d["queue_position"] is not None]  # only if it had to wait
    assert all(d["step"] == 0 and d["steps"] is None and d["queue_position"] >= 0 for d in queued)
    assert progress[: len(queued)] == queued  # waiting comes first
    progress = progress[len(queued):]
    assert [d["step"] for d in progress] == list(range(1, 7))
    assert all(d["steps"] == 6 and d["image_index"] == 0 and d["queue_position"] is None for d in progress)
    kinds = [e for e, _ in events if e != "sdserve.progress"]
    assert kinds == ["image_generation.partial_image", "image_generation.completed"]
    assert set(progress[0]) == {"type", "step", "steps", "image_index", "queue_position"}


def test_a_queued_stream_reports_its_position_and_a_client_that_leaves_stops_its_images(server):
    """With one image in the loop at a time, a long stream holds it: a second one waits (and says
    where it is in the queue) until the first client leaves, which stops the long one's images."""
    interrupted = counter(server, "sdserve_request_failures_total", "interrupted")
    long_body = {"prompt": "long", "size": "128x128", "stream": True, "stream_progress": True, "seed": 1,
                 "num_inference_steps": MAX_STEPS}
    short_body = {"prompt": "short", "size": "128x128", "stream": True, "stream_progress": True, **FAST}

    async def run():
        async with httpx.AsyncClient(timeout=120) as http:
            async with http.stream("POST", url(server), json=long_body, headers={"x-request-id": "long-1"}) as long:
                lines = long.aiter_lines()
                first = None
                async for line in lines:  # wait until the long one is stepping, and time its steps
                    step = json.loads(line[5:])["step"] if line.startswith("data:") else 0
                    if step and first is None:
                        first = (step, time.monotonic())
                    elif first is not None and step >= first[0] + TIMED:
                        step_s = (time.monotonic() - first[1]) / (step - first[0])
                        break
                short = await http.send(http.build_request("POST", url(server), json=short_body), stream=True)
                short_lines = short.aiter_lines()
                queued = None
                async for line in short_lines:
                    if line.startswith("data:"):
                        queued = json.loads(line[5:])
                        break
            # the long stream is closed here: its client left
            left_at = time.monotonic()
            rest = [line async for line in short_lines]
            await short.aclose()
            return queued, step_s, left_at, time.monotonic(), rest

    queued, step_s, left_at, done_at, rest = asyncio.run(run())
    assert queued == {"type": "sdserve.progress", "step": 0, "steps": None, "image_index": None, "queue_position": 0}
    events = list(sse_events(rest))
    assert [d["step"] for e, d in events if e == "sdserve.progress" and d["step"]] == list(range(1, 7))
    assert events[-1][0] == "image_generation.completed"
    # The short request ran as soon as the long one stopped, far sooner than the long one's steps.
    assert done_at - left_at < 0.25 * (MAX_STEPS - 2 * TIMED) * step_s
    assert wait_for(lambda: "request long-1 stopped at step" in server.log())
    stopped_at = int(re.search(r"request long-1 stopped at step (\d+) of", server.log()).group(1))
    assert stopped_at < MAX_STEPS // 2
    assert wait_for(lambda: counter(server, "sdserve_request_failures_total", "interrupted") >= interrupted + 1)
    assert wait_for(lambda: gauge(server, "sdserve_open_streams") == 0)


def test_metrics_count_time_to_first_partial_image(server, client):
    list(client.images.generate(prompt="x", size="128x128", stream=True, partial_images=1, extra_body=FAST))
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    count = re.search(r"^sdserve_time_to_first_partial_image_seconds_count (\S+)$", text, re.M)
    assert count and float(count.group(1)) >= 1
    assert wait_for(lambda: gauge(server, "sdserve_open_streams") == 0)


def test_a_failure_in_the_stream_is_an_error_event(client, server):
    import openai

    started = time.monotonic()
    with pytest.raises(openai.APIError, match="request deadline passed") as err:
        for _ in client.images.generate(prompt="slow", size="128x128", stream=True, partial_images=1,
                                        extra_headers={"x-request-timeout": "1"},
                                        extra_body={"seed": 1, "num_inference_steps": MAX_STEPS}):
            pass
    assert time.monotonic() - started < 30
    assert err.value.body["type"] == "server_error" and err.value.body["code"] == "deadline_exceeded"
    with httpx.stream("POST", url(server), json={"prompt": "slow", "stream": True, "size": "128x128", "seed": 1,
                                                 "num_inference_steps": MAX_STEPS},
                      headers={"x-request-timeout": "0.5"}, timeout=60) as response:
        events = list(sse_events(response.iter_lines()))
    assert [e for e, _ in events] == ["error"]
    assert events[0][1]["type"] == "error" and set(events[0][1]["error"]) == {"message", "type", "param", "code"}
    # the request fails in the step loop: one image too large for the (injected) memory
    with pytest.raises(openai.APIError, match="out of accelerator memory") as err:
        list(client.images.generate(prompt="big", size="256x256", stream=True, partial_images=2, extra_body=FAST))
    assert err.value.body["code"] == "image_too_large" and err.value.body["type"] == "server_error"
    # the server stopped the slow ones and serves the next request
    assert len(client.images.generate(prompt="x", size="128x128", extra_body=FAST).data) == 1


BAD = [
    # (generate() arguments, param, message)
    ({"size": "big"}, "size", "size: must be 'WIDTHxHEIGHT'"),
    ({"partial_images": 9}, "partial_images", "partial_images: must be an integer from 0 to 8"),
    ({"quality": "ultra", "extra_body": {"num_inference_steps": 4}}, "quality", "quality: must be one of"),
    ({"quality": "ultra", "extra_body": {"steps": 4}}, "quality", "quality: must be one of"),
    ({"background": "purple"}, "background", "background: must be one of auto, opaque"),
    ({"output_compression": 101}, "output_compression", "output_compression: must be an integer from 0 to 100"),
    ({"n": 0}, "n", "n: must be an integer from 1 to"),
    ({"style": "loud"}, "style", "style: must be one of vivid, natural"),
    ({"output_format": "gif"}, "output_format", "output_format: must be one of png, jpeg, webp"),
    ({"extra_body": {"stream_progress": "yes"}}, "stream_progress", "stream_progress: must be true or false"),
]


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("kwargs,param,message", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_fields_are_a_400_before_any_event(client, kwargs, param, message, stream):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", **{"size": "128x128", **kwargs, "extra_body": {**FAST, **kwargs.get(
            "extra_body", {})}}, **({"stream": True} if stream else {}))
    assert err.value.status_code == 400
    assert err.value.body == {"message": err.value.body["message"], "type": "invalid_request_error",
                              "param": param, "code": None}
    assert message in err.value.body["message"]


def test_edit_fields_are_checked_too(client, server):
    import openai

    for kwargs, message in [({"quality": "ultra"}, "quality: must be one of"),
                            ({"input_fidelity": "exact"}, "input_fidelity: must be one of high, low"),
                            ({"stream": True, "partial_images": 12}, "partial_images: must be an integer")]:
        with pytest.raises(openai.BadRequestError, match=re.escape(message)):
            client.images.edit(image=png_file(IMAGE), prompt="x", **kwargs, extra_body=FAST)
    # stream_progress is sdserve's, and only means something on a stream
    refused = httpx.post(url(server), json={"prompt": "x", "stream_progress": True, **FAST}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream_progress"
    assert "only with stream: true" in refused.json()["error"]["message"]
    as_text = httpx.post(url(server), json={"prompt": "x", "stream": "true", **FAST}, timeout=60)
    assert as_text.status_code == 400 and as_text.json()["error"]["message"].startswith("stream: must be true or false")


def test_quality_still_sets_the_steps_when_they_are_not_given(client):
    low = client.images.generate(prompt="x", quality="low", size="128x128", extra_body={"seed": 3})
    steps_given = client.images.generate(prompt="x", quality="high", size="128x128",
                                         extra_body={"seed": 3, "num_inference_steps": 4})
    from sdserve.protocol.image_encoding import read_metadata

    meta = [read_metadata(base64.b64decode(r.data[0].b64_json)) for r in (low, steps_given)]
    assert meta[1]["num_inference_steps"] == 4  # the steps given win over quality
    assert meta[0]["num_inference_steps"] >= 1
    assert decode_png(low.data[0].b64_json).shape == (128, 128, 3)
