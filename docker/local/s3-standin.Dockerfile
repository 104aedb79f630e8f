# S3 STAND-IN for MinIO (make images-local): moto's S3 server (`moto_server`, moto[server] from the
# lock). MinIO's server is shipped by no registry reachable here (PyPI, Debian and npm carry only
# MinIO's client SDKs). Production keeps MinIO (docker/compose.yaml).
#
# What a stand-in means: moto accepts any credentials (no access control) and keeps objects in
# memory. docker/local/s3-standin.sh gives it durability with moto's own recorder: every request is
# appended to /data/recording.jsonl and replayed at the next start. Multipart uploads do not survive
# a replay (their upload ids are random), so objects above the clients' multipart thresholds are
# only safe until the next restart: fine for the stack test's small models, not for real data.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
      $(command -v python3 > /dev/null || echo python3 python3-venv) \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && python3 -m venv /opt/venv
COPY requirements/constraints.txt /opt/constraints.txt
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && /opt/venv/bin/pip install -c /opt/constraints.txt "moto[server]" boto3
COPY docker/local/s3-standin.sh /usr/local/bin/s3-standin.sh
RUN useradd --create-home --uid 10002 --shell /usr/sbin/nologin s3 \
 && mkdir -p /data && chown s3:s3 /data
USER s3
VOLUME ["/data"]
ENTRYPOINT ["/bin/sh", "/usr/local/bin/s3-standin.sh"]
