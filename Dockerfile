# syntax=docker/dockerfile:1
# The FieldSync image: one image for every process (provisioner/capture, projector, gateway,
# snapshots, operator commands); the command picks the role, e.g. `docker run IMAGE gateway`.
ARG PYTHON_IMAGE=python:3.12-slim

# -- build: install the package and its dependencies into a virtual environment -------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/fieldsync
WORKDIR /src
# what pyproject.toml builds: its metadata (readme included) and the packages it lists
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY gateway ./gateway
COPY device ./device
COPY bench ./bench
RUN /opt/fieldsync/bin/pip install --upgrade pip \
    && /opt/fieldsync/bin/pip install . \
    && /opt/fieldsync/bin/fieldsync --help > /dev/null

# -- runtime: the virtual environment and a non-root user, nothing else ---------------------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/fieldsync/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FIELDSYNC_DATA_DIR=/var/lib/fieldsync/data \
    FIELDSYNC_SNAPSHOT_DIR=/var/lib/fieldsync/snapshots
RUN groupadd --system --gid 10001 fieldsync \
    && useradd --system --uid 10001 --gid fieldsync --home-dir /var/lib/fieldsync \
        --shell /usr/sbin/nologin fieldsync \
    && mkdir -p /var/lib/fieldsync/data /var/lib/fieldsync/snapshots \
    && chown -R fieldsync:fieldsync /var/lib/fieldsync
COPY --from=build /opt/fieldsync /opt/fieldsync
WORKDIR /var/lib/fieldsync
USER fieldsync:fieldsync
ENTRYPOINT ["fieldsync"]
CMD ["--help"]
