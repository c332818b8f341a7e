# visionserve on a CUDA runtime. torch's CUDA 13.0 build brings its own CUDA libraries as wheels;
# the base image supplies the driver-facing runtime pieces. Build: docker build -t visionserve .
# One image for every role:
#   docker run --gpus all -v "$PWD:/work" visionserve train job.yml --output /work/outputs
#   docker run --gpus all -p 8000:8000 -e MLFLOW_TRACKING_URI=http://mlflow:5000 visionserve \
#       serve models:/NAME/VERSION --host 0.0.0.0 --api-key-file /run/secrets/key        (one machine)
#   docker run -p 8000:8000 -v hub-state:/var/lib/visionserve-hub visionserve hub --host 0.0.0.0 \
#       --state-dir /var/lib/visionserve-hub --api-key-file /run/secrets/key
#   a Ray cluster's node: the same image with `ray start ...` as its command (KubeRay does that:
#   deploy/rayservice-serve.yaml), serving deploy/serve.yaml or deploy/hub.yaml
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /uvx /bin/

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RAY_SERVE_ENABLE_HA_PROXY=1 \
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 \
    RAY_SERVE_HAPROXY_RETRY_ON="conn-failure empty-response" \
    RAY_SERVE_HAPROXY_RETRIES=6
# (Ray Serve's high-throughput mode, also for `ray start` on cluster nodes built from this image:
#  HAProxy on the HTTP port, requests straight to the replicas, and a request that fails on a dead
#  replica tried again elsewhere; see models/runtime.py)

# g++: CPU replicas compile their classifier with torch.compile (serving/compiled.py); without a
# compiler they log a warning and score with the eager model
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libglib2.0-0 g++ \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# dependencies first (a layer that survives code changes), exactly as locked
COPY pyproject.toml uv.lock .python-version README.md ./
RUN --mount=type=cache,target=/root/.cache/uv uv sync --frozen --no-dev --no-install-project
COPY models ./models
COPY serving ./serving
COPY explain ./explain
COPY loadtests ./loadtests
RUN --mount=type=cache,target=/root/.cache/uv uv sync --frozen --no-dev

# Serve's HTTP port (HAProxy); a Ray head's GCS, dashboard, client server; Ray's metrics export port
# (ray start --metrics-export-port=8080, as KubeRay sets it)
EXPOSE 8000 6379 8265 10001 8080
# (no HEALTHCHECK: the image also runs trainings and Ray nodes; `serve` and `hub` answer GET /health/ready
#  once they can answer requests, which is what a probe of a serving container should ask)

WORKDIR /work
ENTRYPOINT ["visionserve"]
CMD ["--help"]
