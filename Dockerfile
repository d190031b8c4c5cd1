# syntax=docker/dockerfile:1
# reloader on CPU. From the repository root:
#   docker build -t reloader:0.1.0 .
#   docker run --rm -p 8000:8000 -v "$PWD/my-config:/etc/reloader:ro" reloader:0.1.0
# The config is mounted at /etc/reloader (deploy/kubernetes mounts a ConfigMap there); its server.host must be
# 0.0.0.0. The demo's golden images are in the image at /opt/reloader/golden: a config names them by absolute
# path. Runs as uid/gid 10001 and writes only to /tmp and cache_dir, so the root filesystem can be read-only.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/reloader/.venv
ENV PATH=/opt/reloader/.venv/bin:$PATH
# CPU-only wheels (no CUDA libraries), the pair the Makefile pins; installed first so that code changes
# below do not invalidate this layer.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md /src/
COPY reloader /src/reloader
# torch and torchvision are already satisfied (2.14.1+cpu matches ==2.14.1); the rest comes from PyPI.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu /src torch==2.14.1 torchvision==0.29.1 \
 && python -c "import reloader.cli, torch, torchvision; print(torch.__version__, torchvision.__version__)"

FROM ${PYTHON_IMAGE}
# A numeric uid and gid: Kubernetes checks runAsNonRoot against a number, never against a user name.
RUN groupadd --system --gid 10001 reloader \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin reloader
COPY --from=build /opt/reloader/.venv /opt/reloader/.venv
# The demo's warm-up images, where deploy/kubernetes/configmap.yaml names them.
COPY config/golden /opt/reloader/golden
COPY config/eval /opt/reloader/eval
# HOME=/tmp: the only writable place by default (an emptyDir in Kubernetes), for anything that wants a home.
ENV PATH=/opt/reloader/.venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8000
# Exec form: the daemon is PID 1 and gets SIGTERM itself (it finishes requests in flight, then exits 0).
ENTRYPOINT ["reloader"]
CMD ["serve", "--config", "/etc/reloader/models.yaml"]
