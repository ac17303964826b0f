"""Routes sdserve adds to KServe's FastAPI app: the OpenAI Images API (generations and edits), the
playground page, health checks that know about draining and a stuck worker, and model information
that lists adapters.

Registered before KServe's own routes, so where both have a path (the health checks, the v1 model
status and the v2 model metadata) these are the ones that answer.
"""

from __future__ import annotations

import time
import uuid
from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from kserve.errors import InvalidInput
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..errors import ServingError
from ..protocol.openai_images import EditForm, ModelNotServed, error_body
from ..protocol.openai_stream import EventStreamResponse, ImageStream
from .predictor import SDModel

OPENAI_PREFIX = "/openai/v1"
_STARTED = int(time.time())
_MAX_PART_BYTES = 1 << 30  # per form part; the whole body is bounded by --max_body_bytes first


def register(app: FastAPI, model: SDModel) -> None:
    router = APIRouter()

    async def openai_answer(request: Request, read_body) -> JSONResponse | EventStreamResponse:
        """Run one OpenAI images request; ``read_body`` gives the body, or an error message. A bad
        request is a JSON error even with ``stream: true``: it is checked before any event."""
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        headers = {"x-request-id": request_id}
        body, problem = await read_body(request)
        if problem is not None:
            return JSONResponse(error_body(problem, "invalid_request_error"), 400, headers)
        try:
            response = await model.generate_openai(body, dict(request.headers), request_id)
        except InvalidInput as exc:
            return JSONResponse(error_body(exc.reason, "invalid_request_error"), 400, headers)
        except ModelNotServed as exc:
            return JSONResponse(error_body(str(exc), "invalid_request_error", "model_not_found"), 404, headers)
        except ServingError as exc:
            return JSONResponse(error_body(str(exc), "server_error"), exc.http_status, {**headers, **exc.headers()})
        if isinstance(response, ImageStream):
            # no-cache and X-Accel-Buffering: proxies (nginx) must pass each event on as it comes
            return EventStreamResponse(response, headers={**headers, "cache-control": "no-cache",
                                                                  "x-accel-buffering": "no"})
        return JSONResponse(response, headers=headers)

    @router.post(f"{OPENAI_PREFIX}/images/generations")
    async def images_generations(request: Request) -> Response:
        return await openai_answer(request, _json_body)

    @router.post(f"{OPENAI_PREFIX}/images/edits")
    async def images_edits(request: Request) -> Response:
        return await openai_answer(request, _edit_form)

    @router.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        reason = model.not_ready_reason()
        if reason is None:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "reason": reason}, 503)

    @router.get("/v2/health/live")
    async def live() -> JSONResponse:
        # Cheap on purpose; fails only when the worker is wedged, so Kubernetes restarts the pod.
        if model.worker_stuck():
            return JSONResponse({"live": False, "reason": model.not_ready_reason()}, 503)
        return JSONResponse({"live": True})

    @router.get("/v1/models/{model_name}")
    async def v1_model(model_name: str) -> JSONResponse:
        if model_name != model.name:
            return JSONResponse({"error": f"Model with name {model_name} does not exist."}, 404)
        reason = model.not_ready_reason()
        body = {"name": model.name, "ready": reason is None, **model.describe()}
        return JSONResponse(body if reason is None else {**body, "reason": reason}, 200 if reason is None else 503)

    @router.get("/v1/models/{model_name}/schema")
    async def request_schema(model_name: str) -> JSONResponse:
        """The JSON Schema of one request's generation parameters, with this server's bounds."""
        if model_name != model.name:
            return JSONResponse({"error": f"Model with name {model_name} does not exist."}, 404)
        return JSONResponse(model.parser.schema())

    @router.get("/v2/models/{model_name}")
    async def v2_model_metadata(model_name: str) -> JSONResponse:
        if model_name != model.name:
            return JSONResponse({"error": f"Model with name {model_name} does not exist."}, 404)
        return JSONResponse({
            "name": model.name, "versions": None, "platform": "sdserve",
            "inputs": model.get_input_types(), "outputs": model.get_output_types(),
            "parameters": model.describe(),
        })

    @router.get(f"{OPENAI_PREFIX}/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": _STARTED, "owned_by": "sdserve"}]}

    @router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        page = resources.files("sdserve").joinpath("ui/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("{{MODEL_NAME}}", model.name))

    app.include_router(router)
    _document_parameters(app, model)


def _document_parameters(app: FastAPI, model: SDModel) -> None:
    """Put the request schema into the OpenAPI document (/openapi.json, /docs) as a component;
    it depends on the loaded model and the server's limits, so it is added when asked for."""
    build = app.openapi

    def openapi() -> dict:
        document = build()
        if model.parser is not None:
            document.setdefault("components", {}).setdefault("schemas", {})["GenerationParameters"] = model.parser.schema()
        return document

    app.openapi = openapi


async def _json_body(request: Request) -> tuple[object, str | None]:
    try:
        return await request.json(), None
    except ValueError as exc:
        return None, f"request body is not valid JSON: {exc}"


async def _edit_form(request: Request) -> tuple[EditForm | None, str | None]:
    """The multipart parts, files read into memory (RequestGuard has already bounded the body)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":
        return None, (f"request body must be multipart/form-data with an image file and a prompt (as the openai "
                      f"SDK and curl -F send it), got {content_type or 'no content-type'!r}")
    try:
        # starlette's 1 MiB default for a text part would refuse an image sent as base64 text
        form = await request.form(max_part_size=_MAX_PART_BYTES)
    except HTTPException as exc:
        return None, f"multipart body does not parse: {exc.detail}"
    try:
        items = [(key, await value.read() if isinstance(value, UploadFile) else value)
                 for key, value in form.multi_items()]
    finally:
        await form.close()
    return EditForm(items), None
