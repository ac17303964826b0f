"""Starting the server: load the model once, then hand it to ``kserve.ModelServer``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from fastapi.exceptions import RequestValidationError

from ..errors import ServingError
from ..models.layout import ModelStoreError
from .error_handlers import request_validation_handler, serving_error_handler
from .middleware import RequestGuard
from .settings import ServerConfig

log = logging.getLogger("sdserve")


class _DropClientErrorTracebacks(logging.Filter):
    """KServe logs every rejected request as an ERROR with a traceback; sdserve already logs the
    rejection with its request id at INFO, so the duplicate only buries real errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        from kserve.errors import InvalidInput

        return not (record.exc_info and isinstance(record.exc_info[1], InvalidInput))


def configure_logging(args) -> None:
    """KServe's log format for sdserve's own logger too, and no library progress bars."""
    import diffusers
    import transformers
    from kserve import logging as kserve_logging

    if args.configure_logging:
        kserve_logging.configure_logging(args.log_config_file)
        kserve_logger = logging.getLogger(kserve_logging.KSERVE_LOGGER_NAME)
        kserve_logger.addFilter(_DropClientErrorTracebacks())
        log.handlers = list(kserve_logger.handlers)
        log.setLevel(logging.INFO)
        log.propagate = False
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _sync_kserve_args(args) -> None:
    """kserve parses sys.argv into ``model_server.args`` at import and its gRPC server reads its
    message limits from there; make it see the flags (and defaults) parsed here."""
    from kserve import model_server

    for key, value in vars(args).items():
        if hasattr(model_server.args, key):
            setattr(model_server.args, key, value)


def drain_on_sigterm(app, model, grace_s: float) -> None:
    """On SIGTERM, before uvicorn stops accepting connections: turn readiness false, answer new
    requests 503, let queued and running ones finish (up to ``grace_s``), then let the usual
    shutdown run. Installed from the app's lifespan, i.e. after uvicorn set its own handlers."""
    original_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_):
        loop = asyncio.get_running_loop()
        uvicorn_handler = signal.getsignal(signal.SIGTERM)
        drain: list[asyncio.Task] = []  # at most one; also keeps the task referenced

        async def drain_then_exit(signum: int) -> None:
            log.info("SIGTERM: draining (up to %.0f s): not ready, new requests get 503", grace_s)
            finished = await model.drain(grace_s)
            log.info("drained%s; shutting down", "" if finished else " partly (grace period over)")
            if callable(uvicorn_handler):
                uvicorn_handler(signum, None)

        def on_sigterm(signum, frame) -> None:
            if not drain:  # a second SIGTERM changes nothing
                drain.append(loop.create_task(drain_then_exit(signum)))

        signal.signal(signal.SIGTERM, lambda signum, frame: loop.call_soon_threadsafe(on_sigterm, signum, frame))
        async with original_lifespan(app_) as state:
            yield state

    app.router.lifespan_context = lifespan


def serve(config: ServerConfig) -> None:
    import kserve
    from kserve import model_server

    from ..protocol import v2
    from . import routes
    from .predictor import SDModel

    args = config.args
    configure_logging(args)
    _sync_kserve_args(args)
    model = SDModel(args.model_name, config.model, config.limits, config.engine, config.policy)
    try:
        model.load()  # once, before any port opens: readiness means "can generate"
    except ModelStoreError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)
    app = model_server.app
    app.add_exception_handler(ServingError, serving_error_handler)
    app.add_exception_handler(RequestValidationError, request_validation_handler)
    app.add_middleware(RequestGuard, max_body_bytes=args.max_body_bytes, retry_after_s=args.retry_after)
    routes.register(app, model)
    v2.install_binary_decoder()
    drain_on_sigterm(app, model, args.grace_period)
    server = kserve.ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        max_threads=args.max_threads,
        max_asyncio_workers=args.max_asyncio_workers,
        enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url,
        enable_latency_logging=args.enable_latency_logging,
        access_log_format=args.access_log_format,
        event_loop=args.event_loop,
        timeout_keep_alive=args.timeout_keep_alive,
        grace_period=int(args.grace_period),
    )
    server.start([model])
