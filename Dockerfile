# One image for every tier; the command chooses it:
#   docker run IMAGE proxy.firehose | proxy.filtered | proxy.simulator
FROM python:3.12-slim
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir . && useradd --system --no-create-home proxy
USER proxy
# SIGTERM (docker stop) shuts a tier down cleanly: clients get close code 1001, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["trio-run"]
CMD ["proxy.filtered"]
