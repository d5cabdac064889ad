"""The HTTP API (FastAPI): uploads, jobs, artifacts, health."""
