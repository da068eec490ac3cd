#!/usr/bin/env bash
# A broker user of its own for one data owner: deltaml-owner-NAME.
#
# The role user deltaml-owner is shared by every owner (DESIGN §3: one user per role), so an
# owner with its own client could bind its queue to another owner's name and read copies of
# that owner's messages. This user may configure and consume only the queue deltaml.owner.NAME,
# and bind it only to its own name, the owners' fan-out and addresses (the ledger's chain
# events, public on the chain anyway): topic authorisation on deltaml.protocol. It publishes
# like the role user. The daemon then runs with
#   deltaml owner --name NAME --amqp-url amqp://deltaml-owner-NAME:PASSWORD@HOST/ ...
#
#   deploy/rabbitmq/add-owner.sh NAME PASSWORD     (run where rabbitmqctl reaches the broker)
set -euo pipefail
if [[ $# -ne 2 ]]; then
  echo "usage: $0 NAME PASSWORD" >&2
  exit 2
fi
name="$1"
password="$2"
# the bus's party names (deltaml/protocol/messages.py NAME_PATTERN): no regex or routing-key metacharacter
if [[ ! "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$ ]]; then
  echo "$0: $name: a party's name is 1 to 128 letters, digits, '-' or '_', beginning with a letter or digit" >&2
  exit 2
fi
user="deltaml-owner-$name"
queue="deltaml\\.owner\\.$name"
if ! rabbitmqctl -q add_user "$user" "$password" >/dev/null 2>&1; then
  rabbitmqctl -q change_password "$user" "$password" >/dev/null
fi
rabbitmqctl -q set_permissions -p / "$user" \
  "^$queue\$" \
  "^($queue|deltaml\\.protocol|deltaml\\.progress|deltaml\\.dlx|deltaml\\.retry\\.[0-9]+)\$" \
  "^($queue|deltaml\\.protocol|deltaml\\.progress)\$" >/dev/null
rabbitmqctl -q set_topic_permissions -p / "$user" deltaml.protocol \
  ".*" \
  "^to\\.($name|owners|0x[0-9a-f]{40})\$" >/dev/null
echo "broker user $user: its own queue deltaml.owner.$name, bound only to to.$name, to.owners and addresses" >&2
