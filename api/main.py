"""The FastAPI application factory (``uvicorn --factory api.main:create_app``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.routes import artifacts, datasets, health, jobs, models
from shears.db.engine import make_engine, make_sessionmaker
from shears.logs import configure_logging
from shears.settings import Settings, get_settings
from shears.storage import LocalStorage
from worker.celery_app import create_celery


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    engine = make_engine(settings.resolved_database_url)
    storage = LocalStorage(settings.resolved_storage_dir)
    storage.ensure()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(
        title="Shears",
        version="1.0.0",
        summary="Pruning as a service: smaller, faster PyTorch models, with the numbers.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.sessions = make_sessionmaker(engine)
    app.state.storage = storage
    app.state.celery = create_celery(settings)
    install_error_handlers(app)
    for router in (health.router, models.router, jobs.router, artifacts.router):
        app.include_router(router)
    app.include_router(datasets.router)
    return app
