"""Request parameter checks. Each raises -32602 naming the parameter and the limit.

Parameters a method does not know are ignored, as the existing runtime does
(its TypeScript client sends extras such as `streaming` and `draft`).
"""

import math
import re
from typing import Any

from . import limits
from .jsonrpc import invalid_params

_ID_CHARS = re.compile(r"[A-Za-z0-9_\-./@:]+")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def identifier(params: dict, name: str, chars_max: int, required: bool = True) -> str | None:
    """A model or stream id: `[A-Za-z0-9_\\-./@:]`, no `..`, bounded length."""
    value = params.get(name)
    if value is None:
        if required:
            raise invalid_params(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise invalid_params(f"{name} must be a string")
    if len(value) > chars_max:
        raise invalid_params(f"{name} is {len(value)} characters, limit {chars_max}")
    if not _ID_CHARS.fullmatch(value):
        raise invalid_params(f"{name} may contain only letters, digits and _-./@:, got {value!r}")
    if ".." in value:
        raise invalid_params(f"{name} must not contain '..'")
    return value


def model_id(params: dict) -> str:
    return identifier(params, "model_id", limits.MODEL_ID_CHARS_MAX)


def text(params: dict, name: str, chars_max: int) -> str:
    value = params.get(name)
    if value is None:
        raise invalid_params(f"{name} is required")
    if not isinstance(value, str):
        raise invalid_params(f"{name} must be a string")
    if len(value) > chars_max:
        raise invalid_params(f"{name} is {len(value)} characters, limit {chars_max}")
    return value


def local_path(params: dict) -> str | None:
    value = params.get("local_path")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise invalid_params("local_path must be a non-empty string")
    if len(value) > limits.LOCAL_PATH_CHARS_MAX:
        raise invalid_params(
            f"local_path is {len(value)} characters, limit {limits.LOCAL_PATH_CHARS_MAX}"
        )
    if ".." in value or "~" in value:
        raise invalid_params("local_path must not contain '..' or '~'")
    return value


def integer(params: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = params.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise invalid_params(f"{name} must be an integer")
    if not low <= value <= high:
        raise invalid_params(f"{name} is {value}, must be in {low}..{high}")
    return value


def temperature(params: dict) -> float:
    value = params.get("temperature")
    if value is None:
        return limits.TEMPERATURE_DEFAULT
    if not _is_number(value) or not 0 <= value <= limits.TEMPERATURE_MAX:
        raise invalid_params(
            f"temperature is {value!r}, must be a number in 0..{limits.TEMPERATURE_MAX}"
        )
    return float(value)


def top_p(params: dict) -> float:
    value = params.get("top_p")
    if value is None:
        return limits.TOP_P_DEFAULT
    if not _is_number(value) or not 0 < value <= 1:
        raise invalid_params(f"top_p is {value!r}, must be a number in (0, 1]")
    return float(value)


def boolean(params: dict, name: str, default: bool) -> bool:
    value = params.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid_params(f"{name} must be a boolean")
    return value
