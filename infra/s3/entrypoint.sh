#!/bin/sh
# Start SeaweedFS as the stack's S3 object store (infra/compose runs this in the official
# chrislusf/seaweedfs image, whose shell is BusyBox's: POSIX sh only; so do the tests).
#
# One process: master, volume server, filer and the S3 gateway (`weed server -s3`). Access is
# by key only: an admin identity (creates the buckets) and an application identity limited to
# the stack's buckets, written to the S3 identities file from the environment at each start.
# Refuses to start (exit 64, one line naming the variable) when a key is missing, short, a
# placeholder of the examples or holds anything but letters, digits, '.', '_' and '-' (so the
# identities file needs no escaping), or when a bucket name or a port is not valid.
#
# Environment (a secret may come from a file instead: VAR_FILE=/run/secrets/...):
#   S3_ADMIN_ACCESS_KEY, S3_ADMIN_SECRET_KEY   the administrator (buckets)
#   S3_APP_ACCESS_KEY, S3_APP_SECRET_KEY       what MLflow, Ray and DVC use
#   S3_BUCKETS                                 the buckets the app key may use, comma-separated
#   SEAWEEDFS_DIR                              data folder (default /data)
#   S3_HOST                                    address the S3 API binds (default 0.0.0.0, in a
#                                              container); the master, volume server and filer,
#                                              which take no keys, bind 127.0.0.1 only
#   S3_PORT                                    the S3 API (default 8333)
#   SEAWEEDFS_MASTER_PORT, SEAWEEDFS_VOLUME_PORT, SEAWEEDFS_FILER_PORT   internal (9333, 8080,
#                                              8888; their gRPC ports are these + 10000)
#   S3_ENTRYPOINT_DRY_RUN=1                    check, write the identities file, print the
#                                              command (it holds no secret), exit 0
# Extra arguments are passed on to `weed server`.
set -eu

min_secret_length=16

refuse() {
  echo "s3-entrypoint: refusing to start: $*" >&2
  exit 64
}

# The value of the variable named $1 (names are this script's own, never input).
value_of() {
  eval "printf '%s' \"\${$1:-}\""
}

# $1 from the environment, or the content of the file that $1_FILE names.
load() {
  file=$(value_of "$1_FILE")
  if [ -n "$file" ]; then
    [ -z "$(value_of "$1")" ] || refuse "both $1 and $1_FILE are set; set one"
    [ -f "$file" ] && [ -r "$file" ] || refuse "$1_FILE=$file is not a readable file"
    content=$(cat "$file") || refuse "$1_FILE=$file could not be read"
    eval "$1=\$content"
  fi
}

key() {
  load "$1"
  value=$(value_of "$1")
  [ -n "$value" ] || refuse "$1 is not set or is empty"
  case $value in
    *[Cc][Hh][Aa][Nn][Gg][Ee]-[Mm][Ee]* | *[Cc][Hh][Aa][Nn][Gg][Ee][Mm][Ee]*)
      refuse "$1 is a placeholder of the examples; set a real key"
      ;;
    *[!A-Za-z0-9._-]*)
      refuse "$1 may hold only letters, digits, '.', '_' and '-'"
      ;;
  esac
  if [ -n "${2:-}" ] && [ "${#value}" -lt "$2" ]; then
    refuse "$1 is shorter than $2 characters"
  fi
}

port() {
  value=$(value_of "$1")
  value=${value:-$2}
  case $value in
    '' | *[!0-9]*) refuse "$1=$value is not a port number" ;;
  esac
  [ "$value" -ge 1 ] && [ "$value" -le 55535 ] || refuse "$1=$value is not a port number (1-55535)"
  printf '%s' "$value"
}

key S3_ADMIN_ACCESS_KEY
key S3_APP_ACCESS_KEY
key S3_ADMIN_SECRET_KEY "$min_secret_length"
key S3_APP_SECRET_KEY "$min_secret_length"
[ "$S3_ADMIN_ACCESS_KEY" != "$S3_APP_ACCESS_KEY" ] || refuse "the admin and app keys are the same"

# The buckets, blanks around each name dropped, each an S3 bucket name (3-63 of a-z 0-9 . -).
[ -n "${S3_BUCKETS:-}" ] || refuse "S3_BUCKETS is not set (the buckets the app key may use)"
scoped=""
old_ifs=$IFS
IFS=,
set -f
for bucket in $S3_BUCKETS; do
  bucket=${bucket#"${bucket%%[![:space:]]*}"}
  bucket=${bucket%"${bucket##*[![:space:]]}"}
  [ -n "$bucket" ] || continue
  case $bucket in
    *[!a-z0-9.-]* | [.-]* | *[.-]) refuse "S3_BUCKETS: '$bucket' is not a bucket name (a-z, 0-9, '.', '-')" ;;
  esac
  [ "${#bucket}" -ge 3 ] && [ "${#bucket}" -le 63 ] ||
    refuse "S3_BUCKETS: '$bucket' is not a bucket name (3 to 63 characters)"
  for action in Read Write List Tagging; do
    scoped="$scoped${scoped:+,}\"$action:$bucket\""
  done
done
set +f
IFS=$old_ifs
[ -n "$scoped" ] || refuse "S3_BUCKETS names no bucket (the buckets the app key may use)"

master=$(port SEAWEEDFS_MASTER_PORT 9333) || exit 64
volume=$(port SEAWEEDFS_VOLUME_PORT 8080) || exit 64
filer=$(port SEAWEEDFS_FILER_PORT 8888) || exit 64
s3=$(port S3_PORT 8333) || exit 64
host="${S3_HOST:-0.0.0.0}"

data="${SEAWEEDFS_DIR:-/data}"
mkdir -p "$data" || refuse "could not create SEAWEEDFS_DIR=$data"
config="$data/.s3-identities.json"
umask 077
# Every value was checked above to need no JSON escaping.
printf '{"identities":[%s,%s]}\n' \
  "$(printf '{"name":"admin","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List","Tagging"]}' \
    "$S3_ADMIN_ACCESS_KEY" "$S3_ADMIN_SECRET_KEY")" \
  "$(printf '{"name":"app","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":[%s]}' \
    "$S3_APP_ACCESS_KEY" "$S3_APP_SECRET_KEY" "$scoped")" \
  >"$config.tmp" && mv -f "$config.tmp" "$config" || refuse "could not write $config"
# The identities file is now the one place of the keys.
unset S3_ADMIN_SECRET_KEY S3_APP_SECRET_KEY S3_ADMIN_SECRET_KEY_FILE S3_APP_SECRET_KEY_FILE

# One master, one volume server: a restarted master need not wait 10 s for peers to elect it,
# and a stopping volume server has no other server to send its clients to.
set -- weed server \
  -dir="$data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -master.port="$master" -master.port.grpc=$((master + 10000)) -master.volumeSizeLimitMB=256 \
  -master.electionTimeout=2s -volume.preStopSeconds=1 \
  -volume.port="$volume" -volume.port.grpc=$((volume + 10000)) -volume.max=0 \
  -filer.port="$filer" -filer.port.grpc=$((filer + 10000)) \
  -s3 -s3.ip.bind="$host" -s3.port="$s3" -s3.port.grpc=$((s3 + 10000)) -s3.config="$config" \
  -s3.port.iceberg=0 -s3.port.lance=0 -s3.iam=false \
  "$@"

if [ "${S3_ENTRYPOINT_DRY_RUN:-}" = 1 ]; then
  printf '%s\n' "$*"
  exit 0
fi
exec "$@"
