# tms-gateway container image: built from source in a Rust image, run as an unprivileged
# user in a slim Debian one.
#
#   docker build -t tms-gateway .
#   docker run -d -p 8883:8883 -p 8080:8080 -v tms-data:/data \
#       -e TMS_MQTT_HOSTNAMES=gateway.example.com tms-gateway
#
# Everything the gateway knows (database, CA, server certificate, outbox) is in the volume
# /data. Set TMS_MQTT_HOSTNAMES to the names devices will connect to: the default names in
# the server certificate are the loopback ones and the container's own host name.
# deploy/compose.yaml runs it with PostgreSQL.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions in Cargo.lock.
RUN cargo build --release --locked -p tms-gateway \
    && install -m 0755 target/release/tms-gateway /usr/local/bin/tms-gateway

FROM debian:bookworm-slim
# ca-certificates: SMTP over TLS and webhooks; curl: the health check.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin tms-gateway \
    && install -d -m 0700 -o tms-gateway -g tms-gateway /data
COPY --from=build /usr/local/bin/tms-gateway /usr/local/bin/tms-gateway
COPY deploy/config.example.toml /usr/share/doc/tms-gateway/config.example.toml

USER tms-gateway
ENV TMS_DATA_DIR=/data \
    TMS_MQTT_LISTEN=0.0.0.0:8883 \
    TMS_HTTP_LISTEN=0.0.0.0:8080
VOLUME ["/data"]
EXPOSE 8883 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD curl -sf http://127.0.0.1:8080/readyz >/dev/null || exit 1
# SIGTERM (docker stop): listeners close, devices are marked offline, ingest drains.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tms-gateway"]
CMD ["serve"]
