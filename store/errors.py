"""Errors raised by the store; each maps to one HTTP status in the API."""


class StoreError(Exception):
    """Base class for every error the store raises on purpose."""


class NotFoundError(StoreError):
    """A collection, image, job, encoder version or vector collection does not exist (HTTP 404)."""


class ConflictError(StoreError):
    """The request clashes with what is stored, e.g. a duplicate name (HTTP 409)."""


class InvalidInputError(StoreError, ValueError):
    """The caller passed a value the store cannot accept, e.g. an empty attribute (HTTP 400/422)."""


class DimensionMismatchError(InvalidInputError):
    """A vector's length differs from its encoder version's dimension."""

    def __init__(self, *, expected: int, actual: int, what: str = "vector"):
        super().__init__(f"{what} has dimension {actual}, but this encoder version expects {expected}")
        self.expected = expected
        self.actual = actual


class InsufficientStorageError(StoreError):
    """A write would leave less free disk space than the configured reserve, or the disk is full (HTTP 507)."""


class SchemaVersionError(StoreError):
    """The database's schema revision is not the one this code was built for."""


class ServiceUnavailableError(StoreError):
    """A service the request needs (e.g. the job queue's broker) cannot be reached; worth a retry (HTTP 503)."""
