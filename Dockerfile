# Calibrated CIFAR-10 service: the shipped model behind `python -m service` (uvicorn).
# Build: docker build -t calib-service .   Run: docker run -p 8000:8000 calib-service
# Checked for real (podman build, run, HEALTHCHECK, answers equal to the host's): deploy/container/check.sh
#
# Two stages: the builder installs the project and its wheels into a virtual environment and
# strips what the server never loads (C headers, test suites); the runtime stage copies only that
# environment, so no pip cache, build tool or source layer ends up in the image.
# SERVICE_EXTRA picks what runs the model: service-litert (the default: LiteRT runs each artifact's
# exported backbone.tflite, the head and MC dropout are NumPy, no TensorFlow in the image; the
# answers equal Keras' to 1e-5, docs/container.md), service-cpu (tensorflow-cpu: Keras, ~1.7 GB) or
# service (the full tensorflow wheel, as `make test` installs). The server picks its runtime from
# what is installed (CALIB_RUNTIME=auto).
ARG SERVICE_EXTRA=service-litert

FROM python:3.11-slim AS builder
ARG SERVICE_EXTRA
# Package-index settings for this stage only (never in the image): a mirror or the CA bundle of
# a TLS-intercepting proxy, e.g. `--build-arg PIP_CERT=...` (deploy/container/check.sh).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# binutils: `strip` for the extension modules below (builder stage only, never in the image).
# DL3008: the builder's tools are not pinned (only their output is copied on).
# hadolint ignore=DL3008
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends binutils > /dev/null \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /src
# Project code; models/ includes the shipped artifact models/shipped/ (package data, so the
# installed package resolves its default model directory without a CWD).
COPY pyproject.toml README.md ./
# Only what the server imports: no training/ (the packages.find include skips what is absent).
COPY commandline.py ./
COPY models/ models/
COPY imagedata/ imagedata/
COPY service/ service/
COPY clients/ clients/
# Non-editable install: the code lands in site-packages, /src is not copied on. The console scripts
# of the training and benchmark commands (absent here) are removed: only calib-serve and
# calib-client work in the image. Then strip
# tensorflow/include (headers for compiling custom ops; absent with service-litert), the packages' own test suites,
# pip and setuptools (nothing installs at run time) and the symbol tables of the packages' own extension
# modules (`strip --strip-unneeded`, ~44 MB; not the vendored *.libs/ libraries, which auditwheel's patchelf
# rewrote and which strip would break); the .pyc files stay (the non-root user could not write them, so every
# start would recompile).
# `client`: httpx, for the calib-client script the image keeps. DL3013: this installs the project itself; its dependency pins live in pyproject.toml.
# hadolint ignore=DL3013
RUN /opt/venv/bin/pip install --no-cache-dir ".[${SERVICE_EXTRA},client]" \
    && find /opt/venv/bin -name 'calib-*' ! -name calib-serve ! -name calib-client -delete \
    && site=$(/opt/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
    && rm -rf "$site/tensorflow/include" \
    && find "$site" -type d -name tests -path "*/site-packages/*/tests" -prune -exec rm -rf {} + \
    && find "$site" -name '*.so' -type f -not -path '*.libs/*' -exec strip --strip-unneeded {} + \
    && /opt/venv/bin/python -m pip uninstall --quiet --yes pip setuptools \
    && /opt/venv/bin/python -I -c "import service.settings as s; assert (s.DEFAULT_MODEL_DIR / 'cifar10-airbench' / 'model_card.json').is_file(), s.DEFAULT_MODEL_DIR; assert all((d / 'backbone.tflite').is_file() for d in s.DEFAULT_MODEL_DIR.iterdir() if (d / 'model_card.json').is_file()), 'shipped model without backbone.tflite: python -m training.export_litert'"

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    TF_CPP_MIN_LOG_LEVEL=3 \
    TF_ENABLE_ONEDNN_OPTS=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    CALIB_HOST=0.0.0.0 \
    CALIB_PORT=8000 \
    CALIB_DATA_DIR=/home/app/data

# /home/app/data: CALIB_DATA_DIR, the SQLite file of the calibration profiles; made here and owned by
# the app user so that a named volume mounted on it starts writable (docs/container.md)
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin app \
    && mkdir /home/app/data && chown app:app /home/app/data
COPY --from=builder /opt/venv /opt/venv
WORKDIR /home/app

USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CALIB_PORT', '8000') + '/health/ready', timeout=4)"]
CMD ["python", "-m", "service"]
