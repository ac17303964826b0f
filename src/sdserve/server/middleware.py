"""ASGI middleware in front of KServe's app: a request body limit, cancellation of a request's
handler when its client disconnects (so the engine stops work nobody will read), and a
Retry-After on every 503 (KServe's own "model not ready" answers carry none)."""

from __future__ import annotations

import asyncio
import json
import logging

log = logging.getLogger("sdserve")


class RequestGuard:
    """413 for bodies over ``max_body_bytes``; cancels the handler when the client goes away
    before the response has started."""

    def __init__(self, app, max_body_bytes: int, retry_after_s: int = 1):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.retry_after = str(retry_after_s).encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(send)
            return
        chunks, size, more = [], 0, True
        while more:  # read the body first: its size is checked before anything parses it
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                await self._too_large(send)
                return
        body = b"".join(chunks)
        disconnected = asyncio.Event()
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                if message["status"] == 503 and not any(k.lower() == b"retry-after" for k, _ in headers):
                    message = {**message, "headers": headers + [(b"retry-after", self.retry_after)]}
            await send(message)

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        handler = asyncio.ensure_future(self.app(scope, replay, tracking_send))
        watcher = asyncio.ensure_future(watch())
        await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
        client_gone = watcher.done() and not handler.done() and not started
        if client_gone:
            log.info("client disconnected from %s %s: cancelling its request", scope["method"], scope["path"])
            handler.cancel()
        watcher.cancel()
        try:
            await handler
        except asyncio.CancelledError:
            if not client_gone:
                raise

    async def _too_large(self, send) -> None:
        body = json.dumps({"error": f"request body is over the limit of {self.max_body_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
