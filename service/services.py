"""What a request handler or a task needs: settings, database, artifact store, Celery."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from celery import Celery

from service.artifacts import ArtifactStore, open_store
from service.celery_app import make_celery
from service.db import Database
from service.settings import Settings


@dataclass
class Services:
    settings: Settings

    @cached_property
    def db(self) -> Database:
        return Database(self.settings.database_url)

    @cached_property
    def store(self) -> ArtifactStore:
        return open_store(self.settings.artifact_uri, presign_s=self.settings.download_presign_s)

    @cached_property
    def celery(self) -> Celery:
        return make_celery(self.settings)
