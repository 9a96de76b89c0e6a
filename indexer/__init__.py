"""Indexing: job planning and shard bodies, the Celery app factory and tasks, the in-process dispatcher, query
encoding, ingest of files, and the read -> encode -> write runner."""
