# One image for every tier; the command chooses it:
#   docker run IMAGE proxy.firehose | proxy.filtered | proxy.simulator
FROM python:3.12-slim
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir . && useradd --system --no-create-home proxy
USER proxy
# Clients: filtered proxy 8765, firehose 8767, simulator 8766; /healthz, /readyz, /metrics:
# filtered 9765, firehose 9767 (defaults; each is configurable).
EXPOSE 8765 8767 8766 9765 9767
# Healthy while the tier answers /healthz (alive). Not /readyz: during an upstream outage
# the tier keeps its clients and reconnects by itself, which is no reason to restart it.
# The image does not know which tier its command runs, so the check (python: the image has
# no curl) tries the firehose's metrics port, then the filtered proxy's, each from the
# environment or its default (0 = off), and for the simulator, which has no HTTP side, that
# its WebSocket port accepts connections. Ports set only in a .env file are not seen here.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 CMD ["python", "-c", "import os, socket, sys, urllib.request\nfor name, default in (('FIREHOSE_METRICS_PORT', '9767'), ('FILTERED_METRICS_PORT', '9765')):\n    port = os.environ.get(name, default)\n    try:\n        if port != '0' and urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=3).status == 200:\n            sys.exit(0)\n    except (OSError, ValueError):\n        pass\ntry:\n    socket.create_connection(('127.0.0.1', int(os.environ.get('SIMULATOR_PORT', '8766'))), timeout=3).close()\nexcept (OSError, ValueError):\n    sys.exit(1)\n"]
# SIGTERM (docker stop) shuts a tier down cleanly: clients get close code 1001, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["trio-run"]
CMD ["proxy.filtered"]
