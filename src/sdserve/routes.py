"""Routes sdserve adds to KServe's FastAPI app: the OpenAI Images API and the playground page.

KServe has no image route of its own; these share its app, port, middleware and metrics.
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
        if not model.ready:
            return JSONResponse(error_body("model is not ready", "server_error"), 503, headers)
        try:
            response = await model.generate_openai(body, request_id)
        except InvalidInput as exc:
            return JSONResponse(error_body(exc.reason, "invalid_request_error"), 400, headers)
        except ModelNotServed as exc:
            return JSONResponse(error_body(str(exc), "invalid_request_error", "model_not_found"), 404, headers)
        except ServingError as exc:
            kind = "server_error"
            return JSONResponse(error_body(str(exc), kind), exc.http_status, {**headers, **exc.headers()})
        return JSONResponse(response, headers=headers)

    @router.get(f"{OPENAI_PREFIX}/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": _STARTED, "owned_by": "sdserve"}]}

    @router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        page = resources.files("sdserve").joinpath("ui/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("{{MODEL_NAME}}", model.name))

    app.include_router(router)
