"""Metadata filters (`where`) as an SQL condition over the items' JSON metadata: `{"key": value}` is equality,
`{"key": {"in": [v1, v2]}}` membership, several keys are ANDed. Keys are top-level metadata keys; values are
JSON scalars, compared with their JSON type (1 matches 1 and 1.0 but not "1" or true; null matches JSON null,
not a missing key).

Limits, refused with InvalidCollectionError: at most MAX_FILTER_KEYS (64) keys per filter, MAX_IN_VALUES
(10,000) values per "in" list, keys of MAX_KEY_LENGTH (256) characters. Each key's values travel as one JSON
array parameter expanded by `json_each`, so the SQL stays the same small size whatever the list's length
(one OR term per value overflowed SQLite's expression depth of 1,000).
"""

from __future__ import annotations

import json
import math
import reprlib

from index.errors import InvalidCollectionError

MAX_FILTER_KEYS = 64
MAX_IN_VALUES = 10_000
MAX_KEY_LENGTH = 256

# A JSON value as a comparable SQL pair (kind, value): json_type with 'real' folded into 'integer' (1 matches
# 1.0), and the SQL value with JSON null's NULL made 0 so that IN can match it (true and false also read as
# 1 and 0: the kind tells them from numbers). The metadata's value at a key is paired the same way as each
# element of the "in" list; IN over the uncorrelated subquery builds its lookup table once per search.
_KEY_MATCHES_ANY = ("(replace(json_type(metadata, ?), 'real', 'integer'), ifnull(json_extract(metadata, ?), 0)) "
                    "IN (SELECT replace(type, 'real', 'integer'), ifnull(value, 0) FROM json_each(?))")


def where_clause(where: dict | None) -> tuple[str, list] | None:
    """(SQL condition on the column `metadata`, its parameters), or None without a filter."""
    if where is None:
        return None
    if not isinstance(where, dict) or not where:
        raise InvalidCollectionError(f"where must be a non-empty JSON object of metadata keys, got {_short(where)}")
    if len(where) > MAX_FILTER_KEYS:
        raise InvalidCollectionError(f"where names {len(where)} keys; at most {MAX_FILTER_KEYS} keys per filter")
    conditions, params = [], []
    for key, condition in where.items():
        path = _json_path(key)
        conditions.append(_KEY_MATCHES_ANY)
        params.extend([path, path, _values_json(key, condition)])
    return " AND ".join(conditions), params


def _json_path(key: object) -> str:
    """The SQLite JSON path of a top-level key; keys with a double quote cannot be addressed: refused."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH or '"' in key:
        raise InvalidCollectionError(f"where key {_short(key)} must be a string of 1-{MAX_KEY_LENGTH} characters "
                                     "without double quotes")
    return f'$."{key}"'


def _values_json(key: str, condition: object) -> str:
    """The values a key may take, as one JSON array: the "in" list, or the one value (an empty list matches
    nothing)."""
    values = _in_values(key, condition) if isinstance(condition, dict) else [condition]
    for value in values:
        _check_scalar(key, value)
    return json.dumps(values, allow_nan=False)


def _in_values(key: str, condition: dict) -> list:
    """The values of `{"in": [...]}`; any other operator is refused."""
    if set(condition) != {"in"} or not isinstance(condition["in"], list):
        raise InvalidCollectionError(f"where[{_short(key)}] must be a value or {{\"in\": [values]}}, "
                                     f"got {_short(condition)}")
    if len(condition["in"]) > MAX_IN_VALUES:
        raise InvalidCollectionError(f"where[{_short(key)}] has {len(condition['in'])} values; at most "
                                     f"{MAX_IN_VALUES} values in an \"in\" list")
    return condition["in"]


def _check_scalar(key: str, value: object) -> None:
    """A JSON scalar SQLite can compare: null, true/false, a string, or a finite number in int64's range."""
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int | float) and math.isfinite(value) and abs(value) < 2**63:
        return
    raise InvalidCollectionError(f"where[{_short(key)}]: {_short(value)} is not a JSON scalar "
                                 "(string, number, true/false, null)")


def _short(value: object) -> str:
    """A bounded repr for error messages: a filter may hold 10,000 values or 5,000 keys."""
    short = reprlib.Repr()
    short.maxlevel, short.maxdict, short.maxlist, short.maxstring, short.maxother = 3, 6, 6, 60, 60
    return short.repr(value)
