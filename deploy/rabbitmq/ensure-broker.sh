#!/usr/bin/env bash
# Start RabbitMQ if none answers, enable the management UI, load DeltaML's definitions.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ready="broker ready: amqp://127.0.0.1:5672, management UI http://127.0.0.1:15672 (guest/guest)"
# A broker already up with its management UI takes the definitions over HTTP in a few milliseconds;
# each rabbitmq* command below boots an Erlang VM (about 3 s for the three). The import is the
# same either way (idempotent), so it runs every time: an edited definitions.json is always loaded.
if command -v curl >/dev/null 2>&1 &&
   curl -sf --max-time 5 -u guest:guest -H 'content-type: application/json' -X POST \
     --data-binary "@$here/definitions.json" http://127.0.0.1:15672/api/definitions >/dev/null 2>&1; then
  echo "$ready" >&2
  exit 0
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "RabbitMQ is not installed; installing rabbitmq-server from Debian's packages" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi
if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  echo "starting RabbitMQ" >&2
  RABBITMQ_CONFIG_FILE="$here/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$here/enabled_plugins" \
    rabbitmq-server -detached
  for _ in $(seq 1 60); do
    rabbitmq-diagnostics -q ping >/dev/null 2>&1 && break
    sleep 1
  done
  rabbitmq-diagnostics -q ping >/dev/null
fi
rabbitmq-plugins -q enable rabbitmq_management >/dev/null 2>&1 || true
rabbitmqctl -q import_definitions "$here/definitions.json"
echo "$ready" >&2
