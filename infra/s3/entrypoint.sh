#!/usr/bin/env bash
# Start SeaweedFS as the stack's S3 object store (infra/compose runs this; so do the tests).
#
# One process: master, volume server, filer and the S3 gateway (`weed server -s3`). Access is
# by key only: an admin identity (creates the buckets) and an application identity limited to
# the stack's buckets, written to the S3 configuration from the environment at each start.
# Refuses to start (exit 64, one line naming the variable) when a key is missing, short or a
# placeholder of the examples.
#
# Environment (a secret may come from a file instead: VAR_FILE=/run/secrets/...):
#   S3_ADMIN_ACCESS_KEY, S3_ADMIN_SECRET_KEY   the administrator (buckets)
#   S3_APP_ACCESS_KEY, S3_APP_SECRET_KEY       what MLflow, Ray and DVC use
#   S3_BUCKETS                                 the buckets the app key may use, comma-separated
#   SEAWEEDFS_DIR                              data folder (default /data)
#   S3_HOST                                    address to bind (default 0.0.0.0, in a container)
#   S3_PORT                                    the S3 API (default 8333)
#   SEAWEEDFS_MASTER_PORT, SEAWEEDFS_VOLUME_PORT, SEAWEEDFS_FILER_PORT   internal (9333, 8080,
#                                              8888; their gRPC ports are these + 10000)
# Extra arguments are passed on to `weed server`.
set -euo pipefail

refuse() {
  echo "s3-entrypoint: refusing to start: $*" >&2
  exit 64
}

load() {
  local name="$1" file_var="$1_FILE"
  if [[ -n "${!file_var:-}" ]]; then
    [[ -r "${!file_var}" ]] || refuse "$file_var=${!file_var} is not a readable file"
    printf -v "$name" '%s' "$(<"${!file_var}")"
  fi
  [[ -n "${!name:-}" ]] || refuse "$name is not set or is empty"
  local lowered="${!name,,}"
  [[ "$lowered" != *change-me* && "$lowered" != *changeme* ]] ||
    refuse "$name is a placeholder of the examples; set a real key"
}

for name in S3_ADMIN_ACCESS_KEY S3_APP_ACCESS_KEY; do load "$name"; done
for name in S3_ADMIN_SECRET_KEY S3_APP_SECRET_KEY; do
  load "$name"
  value="${!name}"
  ((${#value} >= 16)) || refuse "$name is shorter than 16 characters"
done
[[ -n "${S3_BUCKETS:-}" ]] || refuse "S3_BUCKETS is not set (the buckets the app key may use)"
[[ "$S3_ADMIN_ACCESS_KEY" != "$S3_APP_ACCESS_KEY" ]] || refuse "the admin and app keys are the same"

data="${SEAWEEDFS_DIR:-/data}"
mkdir -p "$data"
config="$data/.s3-identities.json"
umask 077
python3 - "$config" <<'PY' || refuse "could not write $config"
import json
import os
import sys

buckets = [b.strip() for b in os.environ["S3_BUCKETS"].split(",") if b.strip()]
scoped = [f"{action}:{bucket}" for bucket in buckets for action in ("Read", "Write", "List", "Tagging")]


def identity(name: str, prefix: str, actions: list[str]) -> dict:
    keys = {"accessKey": os.environ[f"{prefix}_ACCESS_KEY"], "secretKey": os.environ[f"{prefix}_SECRET_KEY"]}
    return {"name": name, "credentials": [keys], "actions": actions}


identities = [
    identity("admin", "S3_ADMIN", ["Admin", "Read", "Write", "List", "Tagging"]),
    identity("app", "S3_APP", scoped),
]
with open(sys.argv[1], "w", encoding="utf-8") as sink:
    json.dump({"identities": identities}, sink)
PY

master="${SEAWEEDFS_MASTER_PORT:-9333}"
volume="${SEAWEEDFS_VOLUME_PORT:-8080}"
filer="${SEAWEEDFS_FILER_PORT:-8888}"
s3="${S3_PORT:-8333}"
host="${S3_HOST:-0.0.0.0}"
exec weed server \
  -dir="$data" -ip=127.0.0.1 -ip.bind="$host" \
  -master.port="$master" -master.port.grpc=$((master + 10000)) -master.volumeSizeLimitMB=256 \
  -volume.port="$volume" -volume.port.grpc=$((volume + 10000)) -volume.max=0 \
  -filer.port="$filer" -filer.port.grpc=$((filer + 10000)) \
  -s3 -s3.port="$s3" -s3.port.grpc=$((s3 + 10000)) -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$config" \
  "$@"
