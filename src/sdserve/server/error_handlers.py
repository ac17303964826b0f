"""sdserve's errors as HTTP answers: the status and headers each error carries, and FastAPI's
validation errors without the input echoed back."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from ..errors import ServingError


async def serving_error_handler(_: Request, exc: ServingError) -> JSONResponse:
    return JSONResponse(status_code=exc.http_status, content={"error": str(exc)}, headers=exc.headers())


async def request_validation_handler(_: Request, exc) -> JSONResponse:
    """FastAPI's default answer echoes the offending input, and fails (500) when that input is
    NaN or infinity; this one names the fields without echoing values."""
    problems = [
        f"{'.'.join(str(p) for p in error['loc'] if p != 'body') or 'body'}: {error['msg']}"
        for error in exc.errors()[:5]
    ]
    return JSONResponse(status_code=422, content={"error": "invalid request: " + "; ".join(problems)})
