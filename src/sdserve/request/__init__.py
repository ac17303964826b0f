"""The request: the one typed, validated ``GenerationRequest`` every protocol converts into, and
everything that decides what a request may be.

    types.py             GenerationRequest, GenerationResult, Limits, RefinerMode
    fields.py            every field name, its description and its aliases
    field_types.py       what each kind of field value may be (annotated types with their checks)
    parameters.py        the fields put together: one pydantic model per server (limits, model)
    parameter_errors.py  the 400 wording: the field, the value and what is allowed
    validation.py        RequestParser: a dict of fields -> GenerationRequest, all checks in one place
    image_input.py       start images and masks: decoded, size-checked, converted
    recipes.py           adapter recipes (sdserve.json): read and validated like requests
    recipe_defaults.py   a request's fields filled from the recipes of the adapters it names
    prompts.py           what the text encoders will read of a prompt (truncation warnings)

May import ``errors``, ``metrics`` and ``models`` (capabilities, samplers); never the engine,
the adapters' weights, the protocols or the server.
"""

from .types import GenerationRequest, GenerationResult, Limits, RefinerMode

__all__ = ["GenerationRequest", "GenerationResult", "Limits", "RefinerMode"]
