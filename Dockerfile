# syntax=docker/dockerfile:1
# Images of cxrlt, one Dockerfile, three targets (README, "Containers"):
#   service (the default, last stage)  the BentoML prediction service
#   stack                              the whole project: Prefect server, the train-eval worker, the web app
#   runtime                            the service's Python packages (shared by both)
#   docker build -t cxrlt-service .
#   docker build --target stack -t cxrlt-stack .
#   docker run -p 127.0.0.1:3000:3000 -e CXRLT_API_TOKEN -v "$HOME/bentoml:/home/app/bentoml" \
#     -v "$PWD/var:/home/app/var" cxrlt-service
# Build arguments:
#   BASE_IMAGE   a Debian/Ubuntu image with Python >= 3.11 (python3 -m venv), or one where apt can install
#                it; default the official python:3.11-slim. The GPU image: an NVIDIA CUDA base with
#                CUDA_EXTRAS=keep (README, "Containers").
#   CUDA_EXTRAS  drop (default): the CPU image, without the CUDA packages torch loads only on a GPU
#                (docker/cuda-extras.txt); keep: every CUDA dependency of torch.
# A proxy's certificate authority reaches pip as a build secret, never as a layer:
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt .
# Inside the container the service listens on all interfaces (docker forwards to it); publish the port on
# 127.0.0.1 as above, or set CXRLT_API_TOKEN before publishing it anywhere else.
# The model store (BENTOML_HOME, with the registry's serving mark) is mounted, so promoting or rolling
# back a model needs a restart, not a rebuild. `bentoml build && bentoml containerize` is the other
# route: an image with the model baked in.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS python
# every image and build layer of this project carries it (the tests prune only what is theirs)
LABEL org.opencontainers.image.title="cxrlt"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    BENTOML_DO_NOT_TRACK=true \
    OMP_WAIT_POLICY=PASSIVE \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# the Python of the base, else Debian's/Ubuntu's (CUDA bases), in a virtual environment owned by root
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip" 2>/dev/null; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c "import sys; assert sys.version_info >= (3, 11), sys.version" \
    && python3 -m venv /opt/venv \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app

FROM python AS runtime
ARG CUDA_EXTRAS=drop
# dependencies first: these layers are reused while only the code changes (the build's layer cache is what
# makes rebuilds fast; pip keeps no download cache in the image)
COPY service/requirements.txt docker/cuda-extras.txt /tmp/requirements/
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip install --no-cache-dir --progress-bar off -r /tmp/requirements/requirements.txt \
    && if [ "$CUDA_EXTRAS" = drop ]; then pip uninstall -y -r /tmp/requirements/cuda-extras.txt; fi \
    && python -c "import torch, torchvision.ops, timm; torchvision.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)"

FROM runtime AS stack
ARG CUDA_EXTRAS=drop
# the whole project's packages (pyproject.toml's dependencies) and git for DVC
COPY pyproject.toml /tmp/requirements/
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca \
    apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/* \
    && if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/requirements/pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements/project.txt \
    && pip install --no-cache-dir --progress-bar off -r /tmp/requirements/project.txt \
    && if [ "$CUDA_EXTRAS" = drop ]; then pip uninstall -y -r /tmp/requirements/cuda-extras.txt; fi
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cxrlt/ cxrlt/
COPY service/ service/
COPY pipelines/ pipelines/
COPY ui/ ui/
COPY docker/stack-entrypoint.sh /usr/local/bin/cxrlt-stack
# the worker may run as the owner of the mounted project (compose.yaml: CXRLT_UID) in the group app: the
# folders under /home/app (and the volumes made from them) are group-writable and keep the group
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && mkdir -p /home/app/bentoml /home/app/var/predictions /home/app/prefect /home/app/dvc-cache \
        /home/app/dvc-remote /home/app/reports \
    && chown -R app:app /home/app \
    && chmod -R g+rwX /home/app \
    && find /home/app -type d -exec chmod g+s {} +
ENV BENTOML_HOME=/home/app/bentoml \
    CXRLT_PREDICTION_LOG=/home/app/var/predictions/predictions.jsonl \
    PREFECT_HOME=/home/app/prefect \
    PYTHONPATH=/app
USER 10001:10001
ENTRYPOINT ["cxrlt-stack"]
CMD ["ui"]

FROM runtime AS service
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cxrlt/ cxrlt/
COPY service/ service/
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && mkdir -p /home/app/bentoml /home/app/var/predictions \
    && chown -R app:app /home/app
ENV BENTOML_HOME=/home/app/bentoml \
    CXRLT_PREDICTION_LOG=/home/app/var/predictions/predictions.jsonl
USER 10001:10001
EXPOSE 3000
# mount the model store on /home/app/bentoml and a folder for the prediction store on /home/app/var (no
# VOLUME line: an anonymous volume would hide a forgotten mount, and buildah's run prefers it to a bind mount)

HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4)"]

CMD ["bentoml", "serve", "service.service:CXRService", "--host", "0.0.0.0", "--port", "3000"]
