"""Indexing: the Celery app and thin tasks, ingest of files, and the read -> encode -> write runner."""
