"""Metadata filters (`where`) as an SQL condition over the items' JSON metadata: `{"key": value}` is equality,
`{"key": {"in": [v1, v2]}}` membership, several keys are ANDed. Keys are top-level metadata keys; values are
JSON scalars, compared with their JSON type (1 does not match "1" or true)."""

from __future__ import annotations

import math

from index.errors import InvalidCollectionError

MAX_IN_VALUES = 1000
MAX_KEY_LENGTH = 256


def where_clause(where: dict | None) -> tuple[str, list] | None:
    """(SQL condition on the column `metadata`, its parameters), or None without a filter."""
    if where is None:
        return None
    if not isinstance(where, dict) or not where:
        raise InvalidCollectionError(f"where must be a non-empty JSON object of metadata keys, got {where!r}")
    conditions, params = [], []
    for key, condition in where.items():
        sql, args = _key_clause(key, condition)
        conditions.append(sql)
        params.extend(args)
    return " AND ".join(conditions), params


def _key_clause(key: object, condition: object) -> tuple[str, list]:
    """The condition on one key: one value, or any of an "in" list."""
    path = _json_path(key)
    values = _in_values(key, condition) if isinstance(condition, dict) else [condition]
    if not values:
        return "0", []  # "in" an empty list matches nothing
    parts = [_value_clause(path, key, value) for value in values]
    return "(" + " OR ".join(sql for sql, _ in parts) + ")", [arg for _, args in parts for arg in args]


def _json_path(key: object) -> str:
    """The SQLite JSON path of a top-level key; keys with a double quote cannot be addressed: refused."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH or '"' in key:
        raise InvalidCollectionError(f"where key {key!r} must be a string of 1-{MAX_KEY_LENGTH} characters "
                                     "without double quotes")
    return f'$."{key}"'


def _in_values(key: str, condition: dict) -> list:
    """The values of `{"in": [...]}`; any other operator is refused."""
    if set(condition) != {"in"} or not isinstance(condition["in"], list):
        raise InvalidCollectionError(f"where[{key!r}] must be a value or {{\"in\": [values]}}, "
                                     f"got {condition!r}")
    if len(condition["in"]) > MAX_IN_VALUES:
        raise InvalidCollectionError(f"where[{key!r}]: at most {MAX_IN_VALUES} values in an \"in\" list")
    return condition["in"]


def _value_clause(path: str, key: str, value: object) -> tuple[str, list]:
    """Equality of the key's JSON value with one scalar, type included."""
    if value is None:
        return "json_type(metadata, ?) = 'null'", [path]
    if isinstance(value, bool):
        return "json_type(metadata, ?) = ?", [path, "true" if value else "false"]
    if isinstance(value, int | float) and math.isfinite(value) and abs(value) < 2**63:  # SQLite's range
        sql = "(json_type(metadata, ?) IN ('integer', 'real') AND json_extract(metadata, ?) = ?)"
        return sql, [path, path, value]
    if isinstance(value, str):
        return "(json_type(metadata, ?) = 'text' AND json_extract(metadata, ?) = ?)", [path, path, value]
    raise InvalidCollectionError(f"where[{key!r}]: {value!r} is not a JSON scalar "
                                 "(string, number, true/false, null)")
