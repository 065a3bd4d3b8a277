# syntax=docker/dockerfile:1.7
# Redis for the local container stack: Debian's redis-server on the same Debian base as the other images
# (no registry needed). The chart's Redis Deployment passes `redis-server --save '' ...` as arguments, so
# the image has no entry point of its own: the arguments are the command.
#
#   podman build -f infra/containers/redis.Dockerfile -t localhost/liveavatar-redis .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -q \
    && apt-get install -y -q --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && redis-server --version
EXPOSE 6379
WORKDIR /tmp
USER 10001:10001
CMD ["redis-server", "--save", "", "--appendonly", "no", "--protected-mode", "no"]
