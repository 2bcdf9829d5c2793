# The demo backends (echo servers) for envoy/docker-compose.yml. Docker builds it
# from the repository root when the image is missing; `make compose-test` instead
# tags an image holding the echo-upstream it already built (no image can be pulled
# on our CI machines).
# Same Debian release in both stages, so the binary finds the glibc it was linked against.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p gateway-tests --bin echo-upstream

FROM debian:bookworm-slim
COPY --from=build /src/target/release/echo-upstream /usr/local/bin/echo-upstream
ENTRYPOINT ["echo-upstream"]
