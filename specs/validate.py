"""Shared checks for everything a user hands Switchyard: plain-data YAML, finite numbers, integer ranges.

Every loader (job specs, ``--set``, pipeline and sweep files, cluster.yaml)
reads YAML through :func:`load_plain_yaml`, and every raw mapping goes through
:func:`check_plain` before it is validated, so one policy holds everywhere:

- YAML is plain data only: mappings, lists, strings, integers, floats,
  booleans and null. Dates, sets, binary, ordered maps, explicit tags, merge
  keys (``<<``), anchors/aliases and duplicate keys are refused with the line.
- A document is at most ``MAX_YAML_BYTES`` long and nested at most
  ``MAX_DEPTH`` deep.
- Numbers are finite, and integers fit in a signed 64-bit integer (SQLite's
  and torch's range).

Errors are :class:`specs.errors.UsageError`: one line, exit code 2.
"""
from __future__ import annotations

import math
import re
from typing import Any

import yaml

from specs.errors import UsageError

MAX_YAML_BYTES = 1 << 20
"""Largest YAML document read (1 MiB): specs, pipeline and sweep files are a few KB."""
MAX_DEPTH = 32
"""Deepest nesting of mappings and lists accepted."""
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
"""Signed 64-bit range: what SQLite stores and torch takes."""

_TAG = "tag:yaml.org,2002:"
_PLAIN_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null", "map", "seq")}
_WHAT = {"timestamp": "a date/time", "set": "a set (!!set)", "binary": "binary data (!!binary)",
         "omap": "an ordered map (!!omap)", "pairs": "a list of pairs (!!pairs)", "merge": "a merge key (<<)",
         "value": "a value key (=)"}


class InputError(UsageError):
    """Input that is not plain, bounded data: one line naming where."""


def _line(node_or_mark) -> str:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return f"line {mark.line + 1}" if mark is not None else "somewhere"


class PlainLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` narrowed to plain data: see the module docstring."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise InputError(f"{_line(event)}: anchors and aliases (*{event.anchor}) are not allowed; "
                             "write the value out")
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise InputError(f"{_line(event)}: anchors and aliases (&{event.anchor}) are not allowed; "
                             "write the value out")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise InputError(f"{_line(event)}: nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        if node.tag not in _PLAIN_TAGS:
            short = node.tag.removeprefix(_TAG)
            what = _WHAT.get(short, f"the tag {node.tag!r}")
            hint = "; quote it to make it a string" if short == "timestamp" else "; use plain mappings, lists, " \
                "strings, numbers, booleans and null"
            raise InputError(f"{_line(node)}: {what} is not allowed{hint}")
        return super().construct_object(node, deep=deep)

    def construct_mapping(self, node, deep=False):
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep=deep)
        seen: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _TAG + "merge":
                raise InputError(f"{_line(key_node)}: {_WHAT['merge']} is not allowed; write the keys out")
            if not isinstance(key_node, yaml.ScalarNode):
                raise InputError(f"{_line(key_node)}: a mapping key must be a plain scalar, not a "
                                 f"{'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}")
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise InputError(f"{_line(key_node)}: duplicate key {key!r} (first given on "
                                 f"{_line(seen[key])}); give each key once")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-4` and `3E5` as strings; read them as numbers, as users mean.
PlainLoader.add_implicit_resolver(
    _TAG + "float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_plain_yaml(text: str | bytes, source: str = "input") -> Any:
    """Parse one YAML document as plain data; raise InputError/UsageError with one line naming ``source``."""
    if isinstance(text, bytes):
        if len(text) > MAX_YAML_BYTES:
            raise InputError(f"{source}: is {len(text)} bytes; at most {MAX_YAML_BYTES} are read")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{source}: is not UTF-8 text (invalid byte at offset {err.start})") from None
    elif len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise InputError(f"{source}: is longer than {MAX_YAML_BYTES} bytes")
    loader = PlainLoader(text)
    try:
        value = loader.get_single_data()
    except InputError as err:
        raise InputError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise InputError(f"{source}:{where} is not valid YAML ({problem})") from None
    except RecursionError:
        raise InputError(f"{source}: nested too deeply") from None
    except (ValueError, OverflowError) as err:  # a scalar PyYAML resolves but cannot convert
        raise InputError(f"{source}: is not valid YAML ({err})") from None
    finally:
        loader.dispose()
    return check_plain(value, source)


def read_plain_yaml(path: str, what: str = "file", storage_options: dict | None = None) -> Any:
    """Read a YAML file (local path or fsspec URI) as plain data, at most MAX_YAML_BYTES."""
    import fsspec

    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a {what}") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read the {what} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if len(data) > MAX_YAML_BYTES:
        raise InputError(f"{path}: is larger than {MAX_YAML_BYTES} bytes; a {what} is a few KB")
    return load_plain_yaml(data, source=path)


def _where(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "value"


def check_plain(value: Any, source: str = "input", _path: tuple = (), _depth: int = 0) -> Any:
    """Refuse anything but plain, bounded data (dict with str keys, list, str, int, float, bool, None).

    Floats must be finite and integers within the signed 64-bit range. Returns ``value`` unchanged.
    """
    if _depth > MAX_DEPTH:
        raise InputError(f"{source}: {_where(_path)}: nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        check_int64(value, f"{source}: {_where(_path)}")
        return value
    if isinstance(value, float):
        check_finite(value, f"{source}: {_where(_path)}")
        return value
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InputError(f"{source}: {_where(_path + (k,))}: keys must be strings, got {type(k).__name__}")
            check_plain(v, source, _path + (k,), _depth + 1)
        return value
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, source, _path + (i,), _depth + 1)
        return value
    raise InputError(f"{source}: {_where(_path)}: {type(value).__name__} values are not allowed; "
                     "use plain mappings, lists, strings, numbers, booleans and null")


def check_finite(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise InputError(f"{where}: must be a finite number, got {value!r}")
    return value


def check_int64(value: int, where: str, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
    """``value`` is an int (not a bool) within [lo, hi] (default: signed 64-bit)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where}: must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InputError(f"{where}: must be an integer from {lo} to {hi}, got {value}")
    return value


PRIORITY_MIN, PRIORITY_MAX = -1_000_000, 1_000_000
"""Job priorities (higher runs first): `submit --priority`, a pipeline file's priority."""


def check_priority(value, where: str = "priority") -> int:
    """A job priority from a request or a file: an integer from PRIORITY_MIN to PRIORITY_MAX."""
    return check_int64(value, where, PRIORITY_MIN, PRIORITY_MAX)


def int_arg(lo: int, hi: int):
    """An argparse ``type=`` for an integer within [lo, hi] (argparse turns the error into one line, exit 2)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer from {lo} to {hi}, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer from {lo} to {hi}, got {text}")
        return value
    parse.__name__ = "integer"
    return parse


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_arg(hi_s: float):
    """An argparse ``type=`` for a lifetime such as 90m, 12h, 30d or 3600 (seconds), up to ``hi_s``."""
    import argparse

    def parse(text: str) -> float:
        t = text.strip().lower()
        unit = DURATION_UNITS.get(t[-1:], None)
        try:
            value = float(t[:-1] if unit else t) * (unit or 1)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and 0 < value <= hi_s):
            raise argparse.ArgumentTypeError(f"expected a duration such as 90m, 12h or 30d (at most "
                                             f"{hi_s / 86400:g}d), got {text!r}")
        return value
    parse.__name__ = "duration"
    return parse


def float_arg(lo: float, hi: float):
    """An argparse ``type=`` for a finite number within [lo, hi]."""
    import argparse

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number from {lo:g} to {hi:g}, got {text!r}") from None
        if not (math.isfinite(value) and lo <= value <= hi):
            raise argparse.ArgumentTypeError(f"expected a finite number from {lo:g} to {hi:g}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def _section_model(annotation: Any):
    """The pydantic model class inside a field's annotation (``X``, ``X | None``, ...), or None."""
    from typing import get_args

    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for arg in get_args(annotation):
        if (found := _section_model(arg)) is not None:
            return found
    return None


def unknown_field(root: Any, loc: tuple, see: str) -> str:
    """What to say about the unknown field at ``loc`` under the pydantic model ``root``: the known field
    closest to it ("did you mean 'preset'?"), else the section's fields; then where the README lists them."""
    import difflib

    model = root
    for part in loc[:-1]:
        if isinstance(part, int):  # a list item: the same model as its list
            continue
        field = getattr(model, "model_fields", {}).get(part)
        model = _section_model(field.annotation) if field is not None else None
        if model is None:
            return f"unknown field; check the spelling (see README '{see}')"
    names = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    if close:
        return f"unknown field; did you mean '{close[0]}'? (see README '{see}')"
    where = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int)) or "the top level"
    return f"unknown field; {where} takes {', '.join(names)} (see README '{see}')"
