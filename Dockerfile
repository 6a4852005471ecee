# Two images from one file. `api`: the API, the dashboard and the migrations, no torch.
# `worker`: the build worker, with torch and the toolchains (and g++ for AOTInductor).
FROM python:3.11-slim AS base
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service service
COPY workers workers
COPY migrations migrations
RUN useradd --create-home kiln

FROM base AS api
RUN pip install --no-cache-dir . && python -c "import importlib.util as u; assert u.find_spec('torch') is None"
USER kiln

FROM base AS worker
ARG TORCH_SPEC="torch==2.13.0"
RUN apt-get update && apt-get install -y --no-install-recommends g++ bubblewrap \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir "$TORCH_SPEC" && pip install --no-cache-dir '.[worker]'
USER kiln
