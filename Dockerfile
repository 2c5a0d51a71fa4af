# syntax=docker/dockerfile:1
# One image for every carebridge service (listener, workers, migrations, demo models).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# CPU build of torch, installed first so that `pip install .` keeps it instead of pulling the
# multi-GB default (CUDA) wheel. GPU hosts use a CUDA torch build instead:
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXYZ
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/carebridge
COPY pyproject.toml README.md ./
COPY db ./db
COPY models ./models
COPY worker ./worker
COPY listeners ./listeners
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /var/lib/carebridge --shell /usr/sbin/nologin carebridge \
    && mkdir -p /var/lib/carebridge/archive /var/lib/carebridge/models \
    && chown -R carebridge:carebridge /var/lib/carebridge

# Named volumes mounted on these directories start with this ownership.
ENV CAREBRIDGE_ARCHIVE_DIR=/var/lib/carebridge/archive \
    CAREBRIDGE_MODELS_DIR=/var/lib/carebridge/models
USER carebridge
WORKDIR /var/lib/carebridge
EXPOSE 11112 8080
CMD ["carebridge", "--help"]
