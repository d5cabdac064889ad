# One image for the API, the worker and the migrate step.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SHEARS_DATA_DIR=/data SHEARS_HOST=0.0.0.0

WORKDIR /app
# torch first and pinned: on Linux the PyPI wheel carries CUDA, which the GPU worker uses.
RUN pip install torch==2.13.0
COPY pyproject.toml constraints.txt README.md alembic.ini ./
COPY api ./api
COPY worker ./worker
COPY core ./core
COPY shears ./shears
COPY migrations ./migrations
RUN pip install -c constraints.txt -e .

RUN useradd --create-home --uid 1000 shears && mkdir -p /data /cache && chown shears /data /cache
USER shears
EXPOSE 8000
CMD ["uvicorn", "--factory", "api.main:create_app", "--host", "0.0.0.0", "--port", "8000"]
