"""Layer-name prefixes of export and import: which layers a file holds, under which names.

``export(path, prefix="resnet50/", strip_prefix=True)`` writes the layers
under ``resnet50/`` with that prefix removed (``bn1/moving_mean``), and
``import_(path, add_prefix="resnet50/")`` puts them back under it.  The
Store and the Client check these arguments here, so both refuse the same
calls with the same errors (the Client before any call).
"""

from __future__ import annotations

from .errors import InvalidArgument, InvalidType

__all__ = ["text", "export_prefixes"]


def text(value, field: str) -> str:
    """A prefix argument: None means "" (no prefix); anything but a string is InvalidType."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidType(f"{field} must be a string or None, got {type(value).__name__}", field=field)
    return value


def export_prefixes(layers, prefix, strip_prefix) -> tuple[str, str]:
    """``(prefix, strip)`` of an export: the selecting prefix and the one removed from names ("": none).

    ``layers`` (names) and a ``prefix`` both select layers: InvalidArgument
    when both are given, and when a name in ``layers`` ends with "/" (a
    prefix: the error points to ``prefix=``).  ``strip_prefix=True`` means
    the ``prefix`` given, False or None nothing.
    """
    for name in [layers] if isinstance(layers, str) else layers if isinstance(layers, (list, tuple)) else ():
        if isinstance(name, str) and name.endswith("/"):
            raise InvalidArgument(f"layers names {name!r}, a prefix rather than a layer: expected "
                                  f"prefix={name!r} to export every layer under it", field="layers")
    prefix = text(prefix, "prefix")
    if prefix and layers is not None:
        raise InvalidArgument(
            f"layers={layers!r} and prefix={prefix!r} both select layers: expected one of them (layers "
            "names layers; prefix selects every layer whose name starts with it)",
            field="prefix",
        )
    if strip_prefix is True:
        if not prefix:
            raise InvalidArgument("strip_prefix=True removes the prefix given: expected prefix= too, or "
                                  "strip_prefix as a string", field="strip_prefix")
        return prefix, prefix
    return prefix, text(None if strip_prefix is False else strip_prefix, "strip_prefix")
