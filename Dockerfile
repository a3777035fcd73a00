# toolserver-manager: one manager replica (uvicorn) with its built-in checker; also ships the
# standalone `toolserver-checker`.
#
# Where a registry is reachable, `docker build .` works as is: python:3.11-slim and pip from
# the index. Offline (scripts/build-manager-image.sh): BASE_IMAGE is the local debootstrap image
# (Debian bookworm, python3 3.11, no pip) and build/manager-wheels/ holds the project's own wheel,
# every dependency's wheel and pip's wheel, so the build needs no network (--network none).
ARG BASE_IMAGE=python:3.11-slim

# --- build stage: install into /install, so neither the wheels nor pip reach the final image
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# the context is allow-listed by .dockerignore: package sources and build/manager-wheels/ (if any)
COPY . /src
RUN set -eu; \
    if ls /src/build/manager-wheels/pip-*.whl >/dev/null 2>&1; then \
      pip_whl="$(ls /src/build/manager-wheels/pip-*.whl | head -n1)"; \
      python3 "$pip_whl/pip" install --root /install --no-index --find-links /src/build/manager-wheels \
        --break-system-packages --no-warn-script-location --root-user-action=ignore toolserver-manager; \
    else \
      python3 -m pip install --root /install --no-warn-script-location --root-user-action=ignore /src; \
    fi; \
    test -x /install/usr/local/bin/toolserver-manager; \
    # the console's libraries (scripts/build-manager-image.sh puts them in the context) where
    # admin.console_assets_dir looks by default
    if [ -d /src/build/console-assets ]; then \
      mkdir -p /install/var/lib/toolserver-manager; \
      cp -r /src/build/console-assets /install/var/lib/toolserver-manager/console-assets; \
    fi

# --- runtime image -----------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
COPY --from=build /install/ /
RUN set -eu; \
    getent group 10001 >/dev/null || groupadd --gid 10001 manager; \
    getent passwd 10001 >/dev/null || useradd --uid 10001 --gid 10001 --no-create-home \
      --home-dir /tmp --shell /usr/sbin/nologin manager; \
    mkdir -p /etc/toolserver-manager; \
    toolserver-manager --help >/dev/null
# Non-root. Driving the host's engine through a mounted /var/run/docker.sock needs the socket's
# group: `docker run --group-add <gid>`, or securityContext.supplementalGroups in Kubernetes.
USER 10001:10001
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/alive' % os.environ.get('TSM_PORT', '8080'), timeout=2)"]
# The chart runs: toolserver-manager --config /etc/toolserver-manager/manager.yml
CMD ["toolserver-manager", "--host", "0.0.0.0"]
