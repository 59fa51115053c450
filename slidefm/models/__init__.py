"""slidefm.models: slide encoders (``create_slide_encoder`` / ``list_slide_encoders``), MIL, CLIP."""

from typing import Any

__all__ = ["create_slide_encoder", "list_slide_encoders"]


def __getattr__(name: str) -> Any:  # lazy: importing a submodule should not build the registry
    if name in __all__:
        from slidefm.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'slidefm.models' has no attribute {name!r}")
