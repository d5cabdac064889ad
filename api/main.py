"""The FastAPI application factory (``uvicorn --factory api.main:create_app``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from api.docs_pages import install_docs_pages
from api.errors import install_error_handlers
from api.observability import install_metrics
from api.openapi import install as install_openapi
from api.routes import artifacts, datasets, health, jobs, models, plots, ui, webhooks
from shears.auth import KeyResolver, parse_env_keys
from shears.db.engine import autocommit, make_engine, make_sessionmaker
from shears.logs import configure_logging
from shears.settings import Settings, get_settings
from shears.storage import storage_from_settings
from worker.celery_app import create_celery


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    engine = make_engine(settings.resolved_database_url)
    storage = storage_from_settings(settings)
    storage.ensure()

    # The status poll's own pool: no pre-ping round trip (it retries a dropped connection once).
    reads = autocommit(make_engine(settings.resolved_database_url, pre_ping=False))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()
        reads.dispose()

    app = FastAPI(
        title="Shears",
        version="1.0.0",
        summary="Pruning as a service: smaller, faster PyTorch models, with the numbers.",
        lifespan=lifespan,
        # Served by install_docs_pages from vendored copies: FastAPI's own load from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.sessions = make_sessionmaker(engine)
    app.state.reads = reads
    # The status poll's worker threads: few, so that they never need more connections than the
    # pool keeps (5) and do not queue behind one another for the GIL (anyio's default of 40
    # threads gave p99 > 150 ms under load; 4 gave ~40 ms, and more requests per second).
    app.state.read_limiter = anyio.CapacityLimiter(4)
    app.state.storage = storage
    app.state.celery = create_celery(settings)
    app.state.keys = KeyResolver(parse_env_keys(settings.api_keys.get_secret_value()))
    install_error_handlers(app)
    install_metrics(app, app.state.sessions)
    for router in (health.router, models.router, jobs.router, artifacts.router):
        app.include_router(router)
    app.include_router(datasets.router)
    app.include_router(plots.router)
    app.include_router(webhooks.router)
    install_docs_pages(app)
    app.include_router(ui.router)
    install_openapi(app)  # after the routes and error handlers it describes
    return app
