"""The server: KServe's ``ModelServer`` with sdserve's model, routes, flags and guards.

    app.py             start-up: load once, then serve; logging; the SIGTERM drain
    settings.py        the command-line flags (KServe's parser as parent) -> ServerConfig
    predictor.py       SDModel, the thin ``kserve.Model``: load(), predict(), the OpenAI route's work
    model_setup.py     what load() builds on the worker: model, adapters, parser, previewer, warm-up
    routes.py          routes KServe has no place for: OpenAI images, the schema, the playground
    middleware.py      body size limit and 503s while draining, before any route
    request_policy.py  the bearer token and each request's deadline
    error_handlers.py  sdserve's errors as HTTP answers
    preview_setup.py   the previewer streamed requests get

May import every part below it (request, adapters, generation, protocol, models); only ``cli``
imports it.
"""
