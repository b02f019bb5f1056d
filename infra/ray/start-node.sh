#!/usr/bin/env bash
# Start a Ray node in a container (infra/compose) with token authentication, or refuse to.
#
#   start-node.sh head   [more `ray start` options]
#   start-node.sh worker [more `ray start` options]     (joins $RAY_HEAD_ADDRESS, ray-head:6379)
#
# Refuses (exit 64, one line) unless RAY_AUTH_MODE=token and a token is given, by RAY_AUTH_TOKEN or
# in the file RAY_AUTH_TOKEN_PATH names, that is at least 32 characters and not the placeholder of
# the examples. The head's dashboard and Jobs API bind to this container's address on the private
# compose network (or RAY_DASHBOARD_HOST), never to 0.0.0.0; the host reaches them through a
# port published on 127.0.0.1. RAY_NODE_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

refuse() {
  echo "ray-node: refusing to start: $*" >&2
  exit 64
}

role="${1:-}"
shift || true
[[ "$role" == head || "$role" == worker ]] || refuse "usage: start-node.sh head|worker [ray start options]"

[[ "${RAY_AUTH_MODE:-}" == token ]] || refuse "RAY_AUTH_MODE must be 'token' (it is '${RAY_AUTH_MODE:-}')"
token="${RAY_AUTH_TOKEN:-}"
if [[ -z "$token" && -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
  [[ -f "$RAY_AUTH_TOKEN_PATH" && -r "$RAY_AUTH_TOKEN_PATH" ]] ||
    refuse "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is not a readable file"
  token="$(<"$RAY_AUTH_TOKEN_PATH")"
fi
[[ -n "$token" ]] || refuse "no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (make one: openssl rand -hex 32)"
lowered="${token,,}"
[[ "$lowered" != *change-me* && "$lowered" != *changeme* ]] ||
  refuse "the Ray token is the placeholder of the examples; set a real one (openssl rand -hex 32)"
((${#token} >= 32)) || refuse "the Ray token is shorter than 32 characters (openssl rand -hex 32)"

# This container's address on the compose network.
if [[ -n "${RAY_NODE_IP:-}" ]]; then
  node_ip="$RAY_NODE_IP"
else
  node_ip="$(python3 -c 'import socket; print(socket.gethostbyname(socket.gethostname()))')" ||
    refuse "cannot tell this container's address; set RAY_NODE_IP"
fi

if [[ "$role" == head ]]; then
  dashboard_host="${RAY_DASHBOARD_HOST:-$node_ip}"
  case "$dashboard_host" in
    0.0.0.0 | :: | "[::]" | "") refuse "the dashboard must not bind to every interface ('$dashboard_host')" ;;
  esac
  command=(
    ray start --head --block --disable-usage-stats
    --node-ip-address="$node_ip"
    --port=6379
    --dashboard-host="$dashboard_host"
    --dashboard-port=8265
    --ray-client-server-port=10001
  )
else
  command=(
    ray start --block --disable-usage-stats
    --node-ip-address="$node_ip"
    --address="${RAY_HEAD_ADDRESS:-ray-head:6379}"
  )
fi
command+=("$@")

if [[ "${RAY_NODE_DRY_RUN:-}" == 1 ]]; then
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi
exec "${command[@]}"
