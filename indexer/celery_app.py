"""The Celery worker's entry point: `celery -A indexer.celery_app worker -Q ingest,encode,query,generate`.

Celery's command line takes its app from an attribute of the module it names (celery 5.7's `find_app` does
not call factories), so this module is the one place the worker reads settings and builds its app. Nothing
imports it (an import-linter contract); everything else uses the factory in `indexer.tasks`.
"""

from __future__ import annotations

from indexer.tasks import create_celery_app
from omniattr.settings import Settings

app = create_celery_app(Settings())
