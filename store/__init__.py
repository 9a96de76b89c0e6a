"""Storage: metadata tables and functions (SQLAlchemy) and the vector index over Qdrant (server or Edge)."""
