"""
What the API checks, split the way the API splits it.

`check_request` is the create-time check that fails the whole batch (HTTP
400). `check_params` is the asynchronous per-request check: its verdict never
fails the create, it makes that one request end ``errored``. Keeping both here
lets a test read the emulator's contract in one file.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ("CUSTOM_ID_PATTERN", "check_params", "check_request")

CUSTOM_ID_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ROLES = frozenset({"user", "assistant"})


def check_request(index: int, item: Any) -> str:
    """
    The custom_id of ``requests[index]`` after the create-time checks.

    Raises:
        ValueError: a message naming the index (and custom_id) at fault.
    """
    where = f"requests.{index}"
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object with custom_id and params")
    custom_id = item.get("custom_id")
    if custom_id is None:
        raise ValueError(f"{where}.custom_id: Field required")
    if not isinstance(custom_id, str) or not CUSTOM_ID_PATTERN.fullmatch(custom_id):
        raise ValueError(
            f"{where}.custom_id: {custom_id!r} does not match pattern ^[a-zA-Z0-9_-]{{1,64}}$"
        )
    params = item.get("params")
    if params is None:
        raise ValueError(f"{where}.params: Field required (custom_id {custom_id!r})")
    if not isinstance(params, dict):
        raise ValueError(f"{where}.params: expected an object (custom_id {custom_id!r})")
    return custom_id


def check_params(params: dict[str, Any]) -> tuple[str, str] | None:
    """
    ``(error_type, message)`` when the API would reject these Messages params, else None.

    Schema problems are ``invalid_request_error``; a model that does not exist
    is ``not_found_error``, checked last as the API resolves the model after
    the schema.
    """
    model = params.get("model")
    if model is None:
        return ("invalid_request_error", "model: Field required")
    if not isinstance(model, str) or not model:
        return ("invalid_request_error", "model: Input should be a non-empty string")
    max_tokens = params.get("max_tokens")
    if max_tokens is None:
        return ("invalid_request_error", "max_tokens: Field required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        return ("invalid_request_error", f"max_tokens: must be an integer >= 1, got {max_tokens!r}")
    problem = _check_messages(params.get("messages"))
    if problem is not None:
        return ("invalid_request_error", problem)
    temperature = params.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0.0 <= temperature <= 1.0
    ):
        return ("invalid_request_error", f"temperature: must be within 0..1, got {temperature!r}")
    system = params.get("system")
    if system is not None and not isinstance(system, str | list):
        return ("invalid_request_error", "system: Input should be a string or a list of blocks")
    if not model.startswith("claude-"):
        return ("not_found_error", f"model: {model}")
    return None


def _check_messages(messages: Any) -> str | None:
    """What is wrong with ``messages``, or None."""
    if messages is None:
        return "messages: Field required"
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages.{position}: expected an object with role and content"
        if message.get("role") not in _ROLES:
            return f"messages.{position}.role: must be 'user' or 'assistant'"
        content = message.get("content")
        if not isinstance(content, str | list):
            return f"messages.{position}.content: Input should be a string or a list of blocks"
        if isinstance(content, list) and not all(
            isinstance(block, dict) and isinstance(block.get("type"), str) for block in content
        ):
            return f"messages.{position}.content: every block needs a type"
        last_assistant = position == len(messages) - 1 and message.get("role") == "assistant"
        empty = content == [] or (isinstance(content, str) and not content.strip())
        if empty and not last_assistant:
            return ("messages: all messages must have non-empty content except for the "
                    "optional final assistant message")
    if messages[0].get("role") != "user":
        return 'messages: first message must use the "user" role'
    return None
