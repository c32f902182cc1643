"""The index package's one error hierarchy; the service maps these classes to HTTP statuses in one table."""

from __future__ import annotations


class IndexStoreError(Exception):
    """Base class of every error the index package raises on purpose."""


class CollectionNotFoundError(IndexStoreError):
    """No collection of that name exists."""


class CollectionExistsError(IndexStoreError):
    """A collection of that name exists already."""


class InvalidCollectionError(IndexStoreError):
    """A bad request: collection name, index_factory string, dimension, filter, item or vectors."""


class ItemNotFoundError(IndexStoreError):
    """An item id is not in the collection (or has no vector for the model asked about)."""


class ReembedStateError(IndexStoreError):
    """A re-embedding call that does not fit the collection's state (none running, another one, pending)."""


class SpaceChangedError(ReembedStateError):
    """The collection moved into another model's space between embedding a query and searching it."""
