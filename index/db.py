"""The SQLite side of a collection (`items.sqlite`, WAL mode): settings (spec, re-embed target, change
sequence), items and their per-model float32 vectors. Every write runs in one transaction that also bumps the
sequence. Rows in, rows out: `Collection` turns them into dataclasses. Lists of ids travel as one JSON
parameter expanded by `json_each`, so no statement hits SQLite's parameter limit.
"""

from __future__ import annotations

import json
import sqlite3
from array import array
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- JSON values
CREATE TABLE items (
    int_id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the FAISS id; AUTOINCREMENT never reuses one
    id TEXT NOT NULL UNIQUE,                   -- the external id
    kind TEXT NOT NULL,                        -- image | text | vector
    metadata TEXT NOT NULL,                    -- a JSON object
    text TEXT,
    image BLOB,
    image_path TEXT
);
CREATE TABLE vectors (
    model_id TEXT NOT NULL,
    int_id INTEGER NOT NULL REFERENCES items(int_id) ON DELETE CASCADE,
    vector BLOB NOT NULL,                      -- little-endian float32, dim * 4 bytes
    PRIMARY KEY (model_id, int_id)
) WITHOUT ROWID;
CREATE INDEX vectors_by_item ON vectors(int_id);
"""
ITEM_COLUMNS = "items.int_id, items.id, items.kind, items.metadata, items.text, items.image, items.image_path"
IN_JSON = "(SELECT value FROM json_each(?))"
INSERT_ITEM = "INSERT INTO items (id, kind, metadata, text, image, image_path) VALUES (?, ?, ?, ?, ?, ?)"
VECTOR_DTYPE = "<f4"


def _connect(path: Path) -> sqlite3.Connection:
    """A connection usable from any thread (callers serialise writes), in WAL mode with durable commits."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a committed (acknowledged) write survives power loss
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def as_json_list(values: Sequence | np.ndarray) -> str:
    """A list of ids as one JSON parameter for `IN (SELECT value FROM json_each(?))`."""
    return json.dumps(values.tolist() if isinstance(values, np.ndarray) else list(values))


def vector_blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=VECTOR_DTYPE).tobytes()


class ItemsDB:
    """One collection's SQLite database."""

    def __init__(self, path: Path):
        self.path = path
        self.conn = _connect(path)

    @classmethod
    def create(cls, path: Path, spec: dict) -> None:
        """Write a new database holding `spec`, sequence 0 and no items."""
        conn = _connect(path)
        try:
            conn.executescript("BEGIN;" + SCHEMA + "COMMIT;")
            rows = [("spec", json.dumps(spec)), ("reembed", "null"), ("seq", "0")]
            conn.executemany("INSERT INTO settings VALUES (?, ?)", rows)
        finally:
            conn.close()

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT with the change sequence bumped inside; rolled back on any error."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("UPDATE settings SET value = CAST(value AS INTEGER) + 1 WHERE key = 'seq'")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------------------------------------ settings

    def setting(self, key: str) -> object:
        return json.loads(self.conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()[0])

    def seq(self) -> int:
        """The change sequence: the number of write transactions ever committed."""
        return int(self.setting("seq"))

    def set_setting(self, key: str, value: object) -> None:
        """Change one setting in its own transaction."""
        with self.transaction() as conn:
            conn.execute("UPDATE settings SET value = ? WHERE key = ?", (json.dumps(value), key))

    # ------------------------------------------------------------------------------------------ writes

    def replace_items(self, rows: list[tuple], vectors: np.ndarray, model_id: str,
                      served_model: str) -> tuple[np.ndarray, np.ndarray]:
        """Insert `rows` (id, kind, metadata, text, image, image_path) with their vectors for `model_id`,
        replacing items of the same ids. Returns (int ids of replaced items that had a `served_model` vector,
        new int ids)."""
        ids = as_json_list([row[0] for row in rows])
        with self.transaction() as conn:
            old = self._served_int_ids(conn, ids, served_model)
            conn.execute(f"DELETE FROM items WHERE id IN {IN_JSON}", (ids,))  # their vectors cascade
            new = [conn.execute(INSERT_ITEM, row).lastrowid for row in rows]
            blobs = [(model_id, int_id, vector_blob(v)) for int_id, v in zip(new, vectors, strict=True)]
            conn.executemany("INSERT INTO vectors (model_id, int_id, vector) VALUES (?, ?, ?)", blobs)
        return old, np.array(new, dtype=np.int64)

    def delete_items(self, ids: list[str], served_model: str) -> tuple[int, np.ndarray]:
        """Delete items by external id: (number deleted, int ids of those with a `served_model` vector)."""
        ids_json = as_json_list(ids)
        with self.transaction() as conn:
            old = self._served_int_ids(conn, ids_json, served_model)
            deleted = conn.execute(f"DELETE FROM items WHERE id IN {IN_JSON}", (ids_json,)).rowcount
        return deleted, old

    @staticmethod
    def _served_int_ids(conn: sqlite3.Connection, ids_json: str, model_id: str) -> np.ndarray:
        sql = (f"SELECT items.int_id FROM items JOIN vectors ON vectors.int_id = items.int_id "
               f"AND vectors.model_id = ? WHERE items.id IN {IN_JSON}")
        return np.array([r[0] for r in conn.execute(sql, (model_id, ids_json))], dtype=np.int64)

    def write_vectors(self, ids: list[str], vectors: np.ndarray, model_id: str,
                      int_ids: list[int] | None = None) -> int:
        """Add `model_id` vectors to existing items (first write wins); ids that are gone, or whose int id
        differs from `int_ids` (the item was replaced since), are skipped. Returns the number written."""
        with self.transaction() as conn:
            current = {row[0]: row[1] for row in conn.execute(
                f"SELECT id, int_id FROM items WHERE id IN {IN_JSON}", (as_json_list(ids),))}
            expected = int_ids if int_ids is not None else [current.get(i) for i in ids]
            rows = [(model_id, current[i], vector_blob(v))
                    for i, want, v in zip(ids, expected, vectors, strict=True)
                    if i in current and current[i] == want]
            conn.executemany("INSERT OR IGNORE INTO vectors (model_id, int_id, vector) VALUES (?, ?, ?)",
                             rows)
        return len(rows)

    def complete_reembed(self, spec: dict) -> None:
        """Make `spec` (with the target model) current, drop every other model's vectors, end the re-embed."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM vectors WHERE model_id != ?", (spec["model_id"],))
            conn.execute("UPDATE settings SET value = ? WHERE key = 'spec'", (json.dumps(spec),))
            conn.execute("UPDATE settings SET value = 'null' WHERE key = 'reembed'")

    def cancel_reembed(self, target_model: str) -> None:
        """Drop the target model's vectors and end the re-embed."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM vectors WHERE model_id = ?", (target_model,))
            conn.execute("UPDATE settings SET value = 'null' WHERE key = 'reembed'")

    # ------------------------------------------------------------------------------------------ reads

    def count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def item_ids(self, after: str, limit: int) -> list[str]:
        """External ids in id order, the `limit` after `after` (paging)."""
        sql = "SELECT id FROM items WHERE id > ? ORDER BY id LIMIT ?"
        return [row[0] for row in self.conn.execute(sql, (after, limit))]

    def count_with_vector(self, model_id: str) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM vectors WHERE model_id = ?", (model_id,)).fetchone()[0]

    def items_by_id(self, ids: list[str]) -> dict[str, sqlite3.Row]:
        sql = f"SELECT {ITEM_COLUMNS} FROM items WHERE id IN {IN_JSON}"
        return {row["id"]: row for row in self.conn.execute(sql, (as_json_list(ids),))}

    def items_by_int_id(self, int_ids: list[int]) -> dict[int, sqlite3.Row]:
        sql = f"SELECT {ITEM_COLUMNS} FROM items WHERE int_id IN {IN_JSON}"
        return {row["int_id"]: row for row in self.conn.execute(sql, (as_json_list(int_ids),))}

    def hit_rows(self, int_ids: np.ndarray) -> dict[int, tuple[str, str]]:
        """int id → (external id, metadata JSON): what a search hit needs, without the image bytes."""
        sql = f"SELECT int_id, id, metadata FROM items WHERE int_id IN {IN_JSON}"
        return {row[0]: (row[1], row[2]) for row in self.conn.execute(sql, (as_json_list(int_ids),))}

    def ids_with_vector(self, ids: list[str], model_id: str) -> set[str]:
        """The external ids among `ids` that have a vector for `model_id`."""
        sql = (f"SELECT items.id FROM items JOIN vectors ON vectors.int_id = items.int_id "
               f"AND vectors.model_id = ? WHERE items.id IN {IN_JSON}")
        return {row[0] for row in self.conn.execute(sql, (model_id, as_json_list(ids)))}

    def vectors_by_id(self, ids: list[str], model_id: str, dim: int) -> tuple[list[str], np.ndarray]:
        """(external ids, (N, dim) vectors) of those of `ids` with a `model_id` vector, in any order."""
        sql = (f"SELECT items.id, vectors.vector FROM items JOIN vectors ON vectors.int_id = items.int_id "
               f"AND vectors.model_id = ? WHERE items.id IN {IN_JSON}")
        found, matrix = _read_vectors(self.conn.execute(sql, (model_id, as_json_list(ids))), dim)
        return found, matrix

    def vectors_by_int_id(self, int_ids: np.ndarray, model_id: str,
                          dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(int ids (N,), vectors (N, dim)) of those of `int_ids` with a `model_id` vector."""
        sql = f"SELECT int_id, vector FROM vectors WHERE model_id = ? AND int_id IN {IN_JSON}"
        found, matrix = _read_vectors(self.conn.execute(sql, (model_id, as_json_list(int_ids))), dim)
        return np.array(found, dtype=np.int64), matrix

    def model_vectors(self, model_id: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Every (int id, vector) of `model_id`, read in one snapshot."""
        sql = "SELECT int_id, vector FROM vectors WHERE model_id = ?"
        self.conn.execute("BEGIN")  # one read transaction: a consistent snapshot while writers go on (WAL)
        try:
            found, matrix = _read_vectors(self.conn.execute(sql, (model_id,)), dim)
        finally:
            self.conn.execute("COMMIT")
        return np.array(found, dtype=np.int64), matrix

    def live_int_ids(self, model_id: str) -> np.ndarray:
        """Sorted int ids of the items with a `model_id` vector."""
        rows = self.conn.execute("SELECT int_id FROM vectors WHERE model_id = ? ORDER BY int_id", (model_id,))
        return np.array(array("q", (row[0] for row in rows)), dtype=np.int64)

    def candidates(self, condition: str, params: list, model_id: str) -> np.ndarray:
        """Int ids of the items with a `model_id` vector whose metadata satisfies `condition`."""
        sql = (f"SELECT items.int_id FROM items JOIN vectors ON vectors.int_id = items.int_id "
               f"AND vectors.model_id = ? WHERE {condition}")
        rows = self.conn.execute(sql, [model_id, *params])
        return np.array(array("q", (row[0] for row in rows)), dtype=np.int64)

    def pending(self, model_id: str, limit: int) -> list[sqlite3.Row]:
        """Items without a `model_id` vector, oldest first."""
        sql = (f"SELECT {ITEM_COLUMNS} FROM items WHERE NOT EXISTS (SELECT 1 FROM vectors WHERE "
               "vectors.model_id = ? AND vectors.int_id = items.int_id) ORDER BY items.int_id LIMIT ?")
        return self.conn.execute(sql, (model_id, limit)).fetchall()


def _read_vectors(rows: Iterator, dim: int) -> tuple[list, np.ndarray]:
    """(keys, (N, dim) float32) from rows of (key, blob), without holding a Python object per vector."""
    keys, buffer = [], bytearray()
    for key, blob in rows:
        keys.append(key)
        buffer += blob
    return keys, np.frombuffer(buffer, dtype=VECTOR_DTYPE).reshape(len(keys), dim)
