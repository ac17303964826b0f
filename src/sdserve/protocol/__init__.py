"""Protocols: each turns its wire format into ``GenerationRequest``s (parsed by the one
``request.validation.RequestParser``) and ``GenerationResult``s back into its answer.

    v1.py              KServe v1 (``instances`` / ``predictions``), and the shapes other runtimes send
    v2.py              the Open Inference Protocol (REST and gRPC): inputs, parameters, outputs
    v2_inputs.py       v2 BYTES and binary inputs: prompts, images and masks
    openai_images.py   OpenAI images/generations and images/edits (JSON and multipart)
    openai_stream.py   ``stream: true``: server-sent events the openai SDK reads
    image_encoding.py  images out: PNG (with the parameters that reproduce it), JPEG, WebP; base64

May import ``errors``, ``metrics``, ``models``, ``request`` and ``generation`` (streams follow a
job's progress); never the server.
"""
