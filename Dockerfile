# syntax=docker/dockerfile:1
# harbormaster container image: `docker build -t harbormaster .`
# Run it with a config mounted at /etc/harbormaster/harbormaster.toml (docs/kubernetes.md).
#
# Base images are pinned by tag. Pin them by digest too (rust:1.95-bookworm@sha256:...) when
# you build: resolving a digest needs a registry, and this repository's CI has none, so the
# digest cannot be written and checked here. scripts/test lints this file with hadolint.

# ---- build: `cargo build --release --locked`, as on a developer's machine ----
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions of Cargo.lock. The registry and target folders
# are build caches (BuildKit), so a rebuild after a source change recompiles only the crate.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin harbormaster \
    && install -D -m 0755 target/release/harbormaster /out/harbormaster

# ---- run: glibc, libgcc, CA certificates and a non-root user; no shell, no package manager ----
FROM gcr.io/distroless/cc-debian12:nonroot
# Added: the binary. The CA bundle for outbound TLS is the base image's own
# /etc/ssl/certs/ca-certificates.crt; clients are verified against the config's client_ca.
COPY --from=build /out/harbormaster /usr/local/bin/harbormaster
# 65532 is distroless's `nonroot`; numeric so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
# 8883 MQTT over TLS, 1883 plain MQTT, 9090 admin (/healthz /readyz /metrics).
EXPOSE 8883 1883 9090
ENTRYPOINT ["/usr/local/bin/harbormaster"]
CMD ["run", "--config", "/etc/harbormaster/harbormaster.toml"]
