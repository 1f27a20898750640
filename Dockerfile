# Multi-stage build: compile in the Rust image, run in a slim Debian with only the binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin ticketd

FROM debian:bookworm-slim
RUN useradd --system ticketd && mkdir -p /data && chown ticketd /data
COPY --from=build /src/target/release/ticketd /usr/local/bin/ticketd
USER ticketd
ENV HOST=0.0.0.0 PORT=8000 DATABASE_URL=sqlite:///data/ticket.db
EXPOSE 8000
VOLUME ["/data"]
CMD ["ticketd"]
