# syntax=docker/dockerfile:1
# Build: docker build -t credproxy .
# Run:   docker run -e CREDPROXY_ADMIN_TOKEN=... -p 8080:8080 -p 8081:8081 credproxy
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin credproxy

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/credproxy --create-home credproxy
COPY --from=build /src/target/release/credproxy /usr/local/bin/credproxy
COPY config /etc/credproxy
RUN mkdir -p /etc/credproxy/certs && chown credproxy /etc/credproxy/certs
USER credproxy
WORKDIR /var/lib/credproxy
# Listen on all interfaces inside the container; data (SQLite, master key) in the working directory.
ENV CREDPROXY_PROXY__LISTEN=0.0.0.0:8080 \
    CREDPROXY_ADMIN__LISTEN=0.0.0.0:8081 \
    CREDPROXY_INTEGRATIONS__DIR=/etc/credproxy/integrations
VOLUME ["/var/lib/credproxy"]
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=2s CMD curl -fsS http://127.0.0.1:8081/healthz || exit 1
ENTRYPOINT ["credproxy"]
CMD ["serve", "--config", "/etc/credproxy/credproxy.toml"]
