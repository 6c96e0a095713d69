# The compose test's stand-in for the registry:2 image: Debian's docker-registry (Docker
# Distribution 2.8) on the debootstrapped base, with the official image's configuration
# (port 5000, storage in /var/lib/registry).
ARG BASE=skiff-ci/bookworm:minbase-v2
FROM ${BASE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-registry \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/registry /etc/docker/registry \
 && chown docker-registry: /var/lib/registry
COPY registry.yml /etc/docker/registry/config.yml
USER docker-registry
EXPOSE 5000
ENTRYPOINT ["docker-registry", "serve", "/etc/docker/registry/config.yml"]
