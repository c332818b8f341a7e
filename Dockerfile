# visionserve on a CUDA runtime. torch's CUDA 13.0 build brings its own CUDA libraries as wheels;
# the base image supplies the driver-facing runtime pieces. Build: docker build -t visionserve .
# Run:   docker run --gpus all -v "$PWD:/work" visionserve train job.yml --output /work/outputs
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

WORKDIR /work
ENTRYPOINT ["visionserve"]
CMD ["--help"]
