"""Search collections: per-collection FAISS index plus SQLite (items, metadata, vectors); no HTTP here.

`CollectionStore` opens a directory of collections; `Collection` upserts, deletes, searches and re-embeds;
`index.build.build_collection` fills one offline from a data set and a bundle.
"""

from index.collection import (
    MAX_ID_LENGTH,
    MAX_METADATA_DEPTH,
    Collection,
    CollectionSpec,
    Hit,
    Item,
    check_item_id,
)
from index.errors import (
    CollectionExistsError,
    CollectionNotFoundError,
    IndexStoreError,
    InvalidCollectionError,
    ItemNotFoundError,
    ReembedStateError,
)
from index.faiss_index import DEFAULT_INDEX_FACTORY
from index.filters import MAX_FILTER_KEYS, MAX_IN_VALUES
from index.store import CollectionStore

__all__ = [
    "DEFAULT_INDEX_FACTORY",
    "MAX_FILTER_KEYS",
    "MAX_ID_LENGTH",
    "MAX_IN_VALUES",
    "MAX_METADATA_DEPTH",
    "Collection",
    "CollectionExistsError",
    "CollectionNotFoundError",
    "CollectionSpec",
    "CollectionStore",
    "Hit",
    "IndexStoreError",
    "InvalidCollectionError",
    "Item",
    "ItemNotFoundError",
    "ReembedStateError",
    "check_item_id",
]
