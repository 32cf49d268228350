# fabric-operator image: `docker build -t ghcr.io/fabric-dev/fabric-operator:0.1.0 .`
# Stage 1 builds the wheel; stage 2 installs only it and its runtime dependencies.
# The base: an official python slim image (hack/get-images.sh passes a local stand-in).
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip install --no-cache-dir build==1.2.2 \
 && python -m build --wheel --outdir /dist .

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="fabric-operator" \
      org.opencontainers.image.description="Kubernetes operator serving LLMs behind OpenAI-compatible endpoints" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/fabric-dev/fabric-operator"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /dist/*.whl /tmp/
RUN pip install --no-cache-dir /tmp/*.whl \
 && rm -f /tmp/*.whl
# A numeric non-root user: Kubernetes can check runAsNonRoot without a passwd lookup.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["fabric-operator"]
CMD ["run"]
