# Redis from Debian's package, on the same base as the app image: for hosts that cannot pull redis:7 from a
# registry (deploy/smoke.sh builds it as autocode-redis:local; set AUTOCODE_REDIS_IMAGE to use it).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
