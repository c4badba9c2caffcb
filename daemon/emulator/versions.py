"""
API versions: which ``anthropic-version`` values exist and what each changes for a batch row.

SDK 0.x/1.x send ``2023-06-01`` and SDK 2.x sends ``2026-10-21``
(shared/BATCHES_API.md §1), and an organisation runs both at once while it
migrates. The 2026-10-21 changes apply "to each request in a Message Batch
created with 2026-10-21" (MIG), so a batch keeps the version of its create
call and its rows are judged by that version, whatever version later reads it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = (
    "LATEST",
    "SAMPLING_PARAMS",
    "VERSIONS",
    "ApiVersion",
    "check_version_rules",
    "version_from_header",
)

#: The sampling parameters 2026-10-21 removed and 2023-06-01 judges per model.
SAMPLING_PARAMS = ("temperature", "top_p", "top_k")


@dataclass(frozen=True)
class ApiVersion:
    """
    What one ``anthropic-version`` accepts beyond the installed SDK's params type.

    Args:
        name: the header value.
        legacy_params: top-level params the SDK's ``MessageCreateParams`` no longer
            lists but this version still takes.
        removed_params: params this version rejects with a migration message
            (rather than as merely unknown).
        sampling_by_model: judge ``temperature``/``top_p``/``top_k`` by the model's
            ``sampling`` rule (see `model_rules`).
        strict_blocks: reject a ``document`` block in an assistant turn and
            non-empty ``citations`` on a user ``text`` block (MIG).
        output_format_alias: accept top-level ``output_format`` as
            ``output_config.format`` (SO's transition period; choice, see docs).
    """

    name: str
    legacy_params: frozenset[str]
    removed_params: frozenset[str]
    sampling_by_model: bool
    strict_blocks: bool
    output_format_alias: bool


VERSIONS: dict[str, ApiVersion] = {
    "2023-06-01": ApiVersion(
        name="2023-06-01",
        legacy_params=frozenset({*SAMPLING_PARAMS, "output_format"}),
        removed_params=frozenset(),
        sampling_by_model=True,
        strict_blocks=False,
        output_format_alias=True,
    ),
    "2026-10-21": ApiVersion(
        name="2026-10-21",
        legacy_params=frozenset(),
        removed_params=frozenset(SAMPLING_PARAMS),
        sampling_by_model=False,
        strict_blocks=True,
        output_format_alias=False,
    ),
}
LATEST = "2026-10-21"


def version_from_header(value: str | None) -> ApiVersion:
    """
    The version a call names.

    Raises:
        ValueError: the API's 400 message for a missing or unknown version.
    """
    if value is None or not value.strip():
        raise ValueError("anthropic-version: header is required")
    version = VERSIONS.get(value.strip())
    if version is None:
        known = ", ".join(VERSIONS)
        raise ValueError(f"anthropic-version: unknown version {value!r} (known: {known})")
    return version


def _blocks(content: Any) -> Iterable[dict[str, Any]]:
    if isinstance(content, list):
        for block in content:
            if isinstance(block, dict):
                yield block


def check_version_rules(version: ApiVersion, params: dict[str, Any]) -> str | None:
    """The message for what ``version`` rejects in these params, or None."""
    for name in SAMPLING_PARAMS:
        if name in version.removed_params and name in params:
            return (
                f"{name}: not supported under anthropic-version {version.name} "
                "(sampling parameters were removed; omit it)"
            )
    if not version.strict_blocks:
        return None
    messages = params.get("messages")
    if not isinstance(messages, list):
        return None
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        for index, block in enumerate(_blocks(message.get("content"))):
            where = f"messages.{position}.content.{index}"
            if role == "assistant" and block.get("type") == "document":
                return (
                    f"{where}: a document block is not allowed in an assistant message "
                    f"under anthropic-version {version.name}"
                )
            if role == "user" and block.get("type") == "text" and block.get("citations"):
                return (
                    f"{where}.citations: citations on a user text block are not allowed "
                    f"under anthropic-version {version.name}"
                )
    return None
