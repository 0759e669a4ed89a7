# The prediction service, built from the project source (no BentoML bento needed):
#   docker build -t cxrlt-service .
#   docker run -p 127.0.0.1:3000:3000 -e CXRLT_API_TOKEN -v "$HOME/bentoml:/home/app/bentoml" \
#     -v "$PWD/var:/home/app/var" cxrlt-service
# Inside the container the service listens on all interfaces (docker forwards to it); publish the port on
# 127.0.0.1 as above, or set CXRLT_API_TOKEN before publishing it anywhere else.
# The model store (BENTOML_HOME, with the registry's serving mark) is mounted, so promoting or rolling
# back a model needs a restart, not a rebuild. `bentoml build && bentoml containerize` is the other
# route: an image with the model baked in.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    BENTOML_DO_NOT_TRACK=true \
    OMP_WAIT_POLICY=PASSIVE \
    BENTOML_HOME=/home/app/bentoml \
    CXRLT_PREDICTION_LOG=/home/app/var/predictions/predictions.jsonl

RUN groupadd --system --gid 1000 app \
    && useradd --system --uid 1000 --gid app --create-home --home-dir /home/app app

WORKDIR /app

# dependencies first: this layer is reused while only the code changes
COPY service/requirements.txt service/requirements.txt
RUN pip install --no-cache-dir -r service/requirements.txt

COPY pyproject.toml README.md ./
COPY cxrlt/ cxrlt/
COPY service/ service/
RUN pip install --no-cache-dir --no-deps . \
    && mkdir -p /home/app/bentoml /home/app/var/predictions \
    && chown -R app:app /home/app

USER 1000:1000
EXPOSE 3000
VOLUME ["/home/app/bentoml", "/home/app/var"]

HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4)"]

CMD ["bentoml", "serve", "service.service:CXRService", "--host", "0.0.0.0", "--port", "3000"]
