#!/usr/bin/env bash
# Start the MLflow tracking server with its basic-auth app (infra/compose and infra/k8s run this).
#
# Refuses to start (exit 64, one line naming the variable) when a required setting is missing, or
# when a secret is empty, a known default (MLflow's old `password1234`) or a placeholder
# (`change-me` from the examples). Then writes the basic-auth configuration from the template
# basic_auth.ini and the environment, and execs `mlflow server`.
#
# Environment (a secret may come from a file instead: VAR_FILE=/run/secrets/...):
#   MLFLOW_AUTH_ADMIN_PASSWORD       secret, >= 12 characters
#   MLFLOW_FLASK_SERVER_SECRET_KEY   secret, >= 12 characters (CSRF; same on every replica)
#   MLFLOW_AUTH_ADMIN_USERNAME       default: admin
#   MLFLOW_AUTH_DATABASE_URI         users and permissions, e.g. postgresql://u:p@db:5432/mlflow_auth
#   MLFLOW_AUTH_DEFAULT_PERMISSION   READ (default), EDIT, MANAGE or NO_PERMISSIONS
#   MLFLOW_BACKEND_STORE_URI         runs and registry, e.g. postgresql://u:p@db:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION     e.g. s3://mlflow-artifacts (proxied: clients need no S3 keys)
#   MLFLOW_ALLOWED_HOSTS             Host headers to accept (comma-separated; `*` is refused)
#   MLFLOW_CORS_ALLOWED_ORIGINS      optional
#   MLFLOW_HOST, MLFLOW_PORT, MLFLOW_WORKERS   default: 0.0.0.0 (inside the container), 5000, 2
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION   default: false (the pipeline runs no server-side jobs)
#   MLFLOW_AUTH_CONFIG_PATH          where the configuration is written (default under $TMPDIR)
#   MLFLOW_ENTRYPOINT_DRY_RUN=1      check and write the configuration, print the command, exit 0
# Extra arguments are passed on to `mlflow server`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
template="${MLFLOW_AUTH_INI_TEMPLATE:-$here/basic_auth.ini}"
min_secret_length=12 # MLflow's own minimum for a user's password

refuse() {
  echo "mlflow-entrypoint: refusing to start: $*" >&2
  exit 64
}

# VAR from the environment, or the content of the file that VAR_FILE names.
load() {
  local name="$1" file_var="$1_FILE"
  [[ -n "${!file_var:-}" ]] || return 0
  [[ -z "${!name:-}" ]] || refuse "both $name and $file_var are set; set one"
  [[ -f "${!file_var}" && -r "${!file_var}" ]] || refuse "$file_var=${!file_var} is not a readable file"
  printf -v "$name" '%s' "$(<"${!file_var}")"
  export "${name?}"
}

require() {
  [[ -n "${!1:-}" ]] || refuse "$1 is not set or is empty${2:+ ($2)}"
  [[ "${!1}" != *$'\n'* && "${!1}" != *$'\r'* ]] || refuse "$1 spans several lines"
}

secret() {
  local name="$1" lowered
  require "$name" "generate one, e.g. openssl rand -base64 24"
  lowered="${!name,,}"
  if [[ "$lowered" == password1234 || "$lowered" == *change-me* || "$lowered" == *changeme* ]]; then
    refuse "$name is a known default or a placeholder of the examples; set a real secret"
  fi
  ((${#lowered} >= min_secret_length)) || refuse "$name is shorter than $min_secret_length characters"
  [[ "${!name}" == "${!name#[[:space:]]}" && "${!name}" == "${!name%[[:space:]]}" ]] ||
    refuse "$name starts or ends with white space"
}

load MLFLOW_AUTH_ADMIN_PASSWORD
load MLFLOW_FLASK_SERVER_SECRET_KEY
secret MLFLOW_AUTH_ADMIN_PASSWORD
secret MLFLOW_FLASK_SERVER_SECRET_KEY
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
export MLFLOW_AUTH_DEFAULT_PERMISSION="${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}"
case "$MLFLOW_AUTH_DEFAULT_PERMISSION" in
  READ | EDIT | MANAGE | NO_PERMISSIONS) ;;
  *) refuse "MLFLOW_AUTH_DEFAULT_PERMISSION=$MLFLOW_AUTH_DEFAULT_PERMISSION is not READ, EDIT, MANAGE or NO_PERMISSIONS" ;;
esac
require MLFLOW_AUTH_ADMIN_USERNAME
require MLFLOW_AUTH_DATABASE_URI "the basic-auth user store"
require MLFLOW_BACKEND_STORE_URI "the tracking and registry store"
require MLFLOW_ARTIFACTS_DESTINATION "e.g. s3://mlflow-artifacts"
require MLFLOW_ALLOWED_HOSTS "the Host headers clients use, e.g. mlflow:5000,localhost:5000"
[[ ",${MLFLOW_ALLOWED_HOSTS// /}," != *",*,"* ]] || refuse "MLFLOW_ALLOWED_HOSTS must not allow every host (*)"
[[ -f "$template" && -r "$template" ]] || refuse "no basic-auth template at $template"

# Write the configuration: private, rendered in one pass (a value is never re-expanded), with `%`
# doubled since MLflow reads it with configparser's interpolation (%40 in a URI stays %40).
config="${MLFLOW_AUTH_CONFIG_PATH:-${TMPDIR:-/tmp}/mlflow-auth/basic_auth.ini}"
umask 077
mkdir -p "$(dirname "$config")"
python3 - "$template" "$config" <<'PY' || refuse "could not write $config from $template"
import os
import re
import sys

template, target = sys.argv[1:]
names = {
    "MLFLOW_AUTH_DEFAULT_PERMISSION",
    "MLFLOW_AUTH_DATABASE_URI",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
}


def value(match: re.Match) -> str:
    if match[1] not in names:
        sys.exit(f"{template} names ${{{match[1]}}}, which is not a basic-auth setting")
    return os.environ[match[1]].replace("%", "%%")


with open(template, encoding="utf-8") as source:
    text = re.sub(r"\$\{([A-Za-z0-9_]+)\}", value, source.read())
with open(target, "w", encoding="utf-8") as sink:
    sink.write(text)
PY
export MLFLOW_AUTH_CONFIG_PATH="$config"
# MLflow's server-side jobs (GenAI evaluation, prompt optimisation) are not used here; they
# would start seven more Python processes beside the server.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
# The file is now the one source of the admin credentials (MLflow prefers these variables).
unset MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_AUTH_ADMIN_PASSWORD_FILE MLFLOW_AUTH_ADMIN_USERNAME
unset MLFLOW_FLASK_SERVER_SECRET_KEY_FILE

command=(
  mlflow server
  --app-name basic-auth
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --serve-artifacts
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
  --host "${MLFLOW_HOST:-0.0.0.0}"
  --port "${MLFLOW_PORT:-5000}"
  --workers "${MLFLOW_WORKERS:-2}"
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS"
)
if [[ -n "${MLFLOW_CORS_ALLOWED_ORIGINS:-}" ]]; then
  command+=(--cors-allowed-origins "$MLFLOW_CORS_ALLOWED_ORIGINS")
fi
command+=("$@")

if [[ "${MLFLOW_ENTRYPOINT_DRY_RUN:-}" == 1 ]]; then
  # Credentials in URIs are masked.
  printf '%q ' "${command[@]}" | sed -E 's#(://[^:/@ ]*):[^@ ]*@#\1:***@#g'
  echo
  exit 0
fi
exec "${command[@]}"
