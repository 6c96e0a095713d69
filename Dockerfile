# skiff's image: the `skiff` binary built from this source, on Debian slim, run as a user of its
# own (uid 10001). The distributed deployment (docker-compose.yml) runs it as the server and as
# the workers; `docker run --rm skiff --help` lists the commands.
#
#   docker build -t skiff .
#
# The builder and the final stage must use the same Debian release (the binary links Debian's
# glibc): change DEBIAN_RELEASE for both at once. RUST_VERSION follows rust-toolchain.toml.
ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
ARG RUST_VERSION
# The image's toolchain; rust-toolchain.toml would also fetch rustfmt and clippy, which a build
# does not need.
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION} CARGO_TERM_COLOR=never
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin skiff \
 && install -D -m 0755 target/release/skiff /out/skiff

FROM debian:${DEBIAN_RELEASE}-slim
# What steps need: bash runs `run:` steps, git (with ssh for ssh:// remotes) `git/checkout`,
# ca-certificates every https fetch. Add what your steps use (curl, make...) in an image FROM
# this one. No docker CLI: the docker/* actions talk to the engine's socket themselves.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bash ca-certificates git openssh-client \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 skiff \
 && useradd --system --uid 10001 --gid skiff --home-dir /var/lib/skiff --create-home --shell /usr/sbin/nologin skiff
COPY --from=builder /out/skiff /usr/local/bin/skiff
ENV SKIFF_DATA=/var/lib/skiff/data
USER skiff
WORKDIR /var/lib/skiff
EXPOSE 8080
ENTRYPOINT ["skiff"]
CMD ["--help"]
