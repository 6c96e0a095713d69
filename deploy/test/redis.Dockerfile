# The compose test's stand-in for the redis image (which cannot be pulled here): Debian's
# redis-server on the debootstrapped base, laid out like the official image (config under
# /usr/local/etc/redis, data in /data, run as the redis user).
ARG BASE=skiff-ci/bookworm:minbase-v2
FROM ${BASE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data /usr/local/etc/redis \
 && chown redis:redis /data
USER redis
WORKDIR /data
CMD ["redis-server", "/usr/local/etc/redis/redis.conf"]
