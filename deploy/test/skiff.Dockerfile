# The compose test's skiff image: the repository Dockerfile's final stage on the debootstrapped
# base, with the binary built on this machine (same Debian release) copied in instead of built
# in a rust image that cannot be pulled here. compose-up-test checks that the lines between the
# markers stay the same as the Dockerfile's.
ARG BASE=skiff-ci/bookworm:minbase-v2
FROM ${BASE}
# -- same as Dockerfile --
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bash ca-certificates git openssh-client \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 skiff \
 && useradd --system --uid 10001 --gid skiff --home-dir /var/lib/skiff --create-home --shell /usr/sbin/nologin skiff
# -- end --
COPY skiff /usr/local/bin/skiff
ENV SKIFF_DATA=/var/lib/skiff/data
USER skiff
WORKDIR /var/lib/skiff
EXPOSE 8080
ENTRYPOINT ["skiff"]
CMD ["--help"]
