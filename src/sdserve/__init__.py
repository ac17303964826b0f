"""sdserve: a KServe predictor for Stable Diffusion models.

The packages follow the path a request takes, each importing only those listed before it:

    errors, metrics  what every part shares: the errors clients see, the Prometheus metrics
    tiny/            tiny random-weight models for tests and the demo (the real diffusers classes)
    models/          the model store: find, download and load a model; what it can do
    request/         GenerationRequest and its validation (fields, limits, recipes, prompts)
    adapters/        LoRA adapters: stores, listing, loading, per-row deltas in a denoiser call
    generation/      the engine: admission queue, step policy, denoiser calls, decoding
    protocol/        v1, v2 (REST and gRPC) and OpenAI requests in, responses and streams out
    server/          the kserve.Model, flags, routes, middleware and start-up
    training/        ``sdserve train``: DreamBooth LoRA fine-tuning (the train extra)
    cli/             ``sdserve`` / ``python -m sdserve``: the server, generate, tiny-model, train

A request: protocol adapter (parse) -> request.validation -> generation.engine (queue, admission)
-> generation.loop (policy, denoise, decode) -> protocol adapter (encode) -> response.
"""

__version__ = "0.1.0"
