"""Routes sdserve adds to KServe's FastAPI app: the OpenAI Images API, the playground page, health
checks that know about draining and a stuck worker, and model information that lists adapters.

Registered before KServe's own routes, so where both have a path (the health checks, the v1 model
status and the v2 model metadata) these are the ones that answer.
"""

from __future__ import annotations

import time
import uuid
from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from kserve.errors import InvalidInput

from .errors import ServingError
from .predictor import SDModel
from .protocol.openai_images import ModelNotServed, error_body

OPENAI_PREFIX = "/openai/v1"
_STARTED = int(time.time())


def register(app: FastAPI, model: SDModel) -> None:
    router = APIRouter()

    @router.post(f"{OPENAI_PREFIX}/images/generations")
    async def images_generations(request: Request) -> JSONResponse:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        headers = {"x-request-id": request_id}
        try:
            body = await request.json()
        except ValueError as exc:
            return JSONResponse(error_body(f"request body is not valid JSON: {exc}", "invalid_request_error"), 400, headers)
        try:
            response = await model.generate_openai(body, dict(request.headers), request_id)
        except InvalidInput as exc:
            return JSONResponse(error_body(exc.reason, "invalid_request_error"), 400, headers)
        except ModelNotServed as exc:
            return JSONResponse(error_body(str(exc), "invalid_request_error", "model_not_found"), 404, headers)
        except ServingError as exc:
            return JSONResponse(error_body(str(exc), "server_error"), exc.http_status, {**headers, **exc.headers()})
        return JSONResponse(response, headers=headers)

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
