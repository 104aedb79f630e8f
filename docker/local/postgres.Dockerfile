# PostgreSQL from Debian's package (15), for hosts without the `postgres` image (make images-local).
# Production keeps the official `postgres` image (docker/compose.yaml). Same contract as that image
# for the stack: POSTGRES_USER / POSTGRES_PASSWORD at first start, the databases of
# docker/scripts/postgres-init.sh, data in /var/lib/postgresql/data (a volume).
#   docker build -f docker/local/postgres.Dockerfile --build-arg BASE_IMAGE=local/debian:bookworm -t fer-postgres:local docker/local
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
USER postgres
VOLUME ["/var/lib/postgresql/data"]
ENTRYPOINT ["/bin/sh", "/usr/local/bin/postgres-entrypoint.sh"]
