# Calibrated CIFAR-10 service: the shipped model behind `python -m service` (uvicorn).
# Build: docker build -t calib-service .   Run: docker run -p 8000:8000 calib-service
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=3 \
    TF_ENABLE_ONEDNN_OPTS=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    CALIB_HOST=0.0.0.0 \
    CALIB_PORT=8000

RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin app
WORKDIR /app

# Project code; models/ includes the shipped artifact models/shipped/ (package data, so the
# installed package resolves its default model directory without a CWD).
COPY pyproject.toml README.md ./
COPY models/ models/
COPY training/ training/
COPY service/ service/
COPY clients/ clients/
# DL3013: this installs the project itself; its dependency pins live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[service]" \
    && python -I -c "import service.settings as s; assert (s.DEFAULT_MODEL_DIR / 'cifar10-airbench' / 'model_card.json').is_file(), s.DEFAULT_MODEL_DIR"

USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CALIB_PORT', '8000') + '/health/ready', timeout=4)"]
CMD ["python", "-m", "service"]
