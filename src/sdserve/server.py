"""Starting the server: load the model once, then hand it to ``kserve.ModelServer``."""

from __future__ import annotations

import logging
import sys

from .errors import ServingError, serving_error_handler
from .model_store import ModelStoreError
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


def serve(config: ServerConfig) -> None:
    import kserve
    from kserve import model_server

    from . import routes
    from .predictor import SDModel

    args = config.args
    configure_logging(args)
    _sync_kserve_args(args)
    model = SDModel(args.model_name, config.model, config.limits, config.engine)
    try:
        model.load()  # once, before any port opens: readiness means "can generate"
    except ModelStoreError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)
    model_server.app.add_exception_handler(ServingError, serving_error_handler)
    routes.register(model_server.app, model)
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
    )
    server.start([model])
