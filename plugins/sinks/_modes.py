"""
The ``mode`` option of the file sinks: who may read what they write.

``batchd run`` works under umask 077, so outputs are private (0600, directories 0700)
unless a sink's ``mode`` says otherwise, for example ``mode = "0640"`` so that a group
can read the results.
"""

from __future__ import annotations

__all__ = ("directory_mode", "output_mode")


def output_mode(value: object) -> int | None:
    """
    A sink's ``mode`` option: an octal string (``"0640"``) or a TOML integer (``0o640``).

    Read it with ``Options.convert("mode", output_mode, None)``.

    Raises:
        ValueError: naming what is wrong with the value.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"must be an octal mode like \"0640\", got {value!r}")
    if isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            raise ValueError(f"{value!r} is not an octal mode like \"0640\"") from None
    elif isinstance(value, int):
        mode = value
    else:
        raise ValueError(f"must be an octal mode like \"0640\", got {value!r}")
    if not 0 <= mode <= 0o777 or not mode & 0o600 == 0o600:
        raise ValueError(f"{oct(mode)} must be between 0o600 and 0o777 and let the owner read "
                         "and write")
    return mode


def directory_mode(file_mode: int) -> int:
    """The mode for a directory holding files of ``file_mode``: search where read is allowed."""
    return file_mode | ((file_mode & 0o444) >> 2)
