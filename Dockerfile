# syntax=docker/dockerfile:1
# Build: docker build -t credproxy .
# Run:   docker run -e CREDPROXY_ADMIN_TOKEN=... -p 8080:8080 -p 8081:8081 -p 8082:8082 credproxy
# CI cannot run Docker here: scripts/docker-check lints this file (hadolint)
# and runs the same build and start-up commands outside a container.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin credproxy

FROM debian:bookworm-slim
# ca-certificates: the KMS client trusts the system roots.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/credproxy --create-home credproxy \
 && mkdir -p /etc/credproxy/certs \
 && chown 10001 /etc/credproxy/certs
COPY --from=build /src/target/release/credproxy /usr/local/bin/credproxy
COPY config /etc/credproxy
USER 10001
WORKDIR /var/lib/credproxy
# Listen on all interfaces inside the container; data (SQLite, master key) in
# the working directory; the interception CA is mounted at /etc/credproxy/certs.
ENV CREDPROXY_PROXY__LISTEN=0.0.0.0:8080 \
    CREDPROXY_ADMIN__LISTEN=0.0.0.0:8081 \
    CREDPROXY_PUBLIC__LISTEN=0.0.0.0:8082 \
    CREDPROXY_INTEGRATIONS__DIR=/etc/credproxy/integrations
VOLUME ["/var/lib/credproxy"]
EXPOSE 8080 8081 8082
HEALTHCHECK --interval=10s --timeout=3s CMD ["credproxy", "health", "--url", "http://127.0.0.1:8081/healthz"]
ENTRYPOINT ["credproxy"]
CMD ["serve", "--config", "/etc/credproxy/credproxy.toml"]
