"""Only entry points read settings: importing an api or indexer module reads none and builds no Celery app."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_importing_api_and_indexer_modules_reads_no_settings_and_builds_no_celery_app():
    """Every module but the worker's entry module (`celery -A indexer.celery_app` imports it for its app)."""
    code = textwrap.dedent(
        """
        import importlib, pkgutil
        import celery, omniattr.settings

        def refuse(*args, **kwargs):
            raise AssertionError("settings read or Celery app built on import")

        omniattr.settings.Settings.__init__ = refuse
        celery.Celery.__init__ = refuse
        import api, indexer

        names = [
            module.name
            for package in (api, indexer)
            for module in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
        ]
        assert {"indexer.tasks", "indexer.work", "api.app", "api.usecases.search"} <= set(names), names
        for name in names:
            if name != "indexer.celery_app":
                importlib.import_module(name)
        try:  # the entry module does both, which shows that the check above can fail
            importlib.import_module("indexer.celery_app")
        except AssertionError:
            pass
        else:
            raise SystemExit("importing indexer.celery_app built no app: the check does not work")
        """
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
