FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service service
COPY workers workers
COPY migrations migrations
RUN pip install --no-cache-dir "$TORCH_SPEC" && pip install --no-cache-dir '.[onnx]'
RUN useradd --create-home kiln
USER kiln
