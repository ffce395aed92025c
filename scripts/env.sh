# Sourced by scripts/start, scripts/status and scripts/deploy (not a command): the settings of
# ./ingest.env, and the database the supervised programs use.

# load_env_file FILE: export its KEY=value lines (no quotes); variables already set in the calling
# environment win over the file. A problem in the file names its line number, never its content
# (a pasted bare key would be echoed otherwise).
load_env_file() {
  local file=$1 key value n=0
  [ -f "$file" ] || return 0
  if [ -n "$(find "$file" -perm /077 2>/dev/null)" ]; then
    echo "${0##*/}: warning: $file is readable by others (chmod 600 $file)" >&2
  fi
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    case "$line" in ''|'#'*) continue ;; esac
    if [[ "$line" == *$'\r' ]]; then
      echo "${0##*/}: $file line $n ends with a carriage return (saved on Windows? run: sed -i 's/\r\$//' $file)" >&2
      exit 3
    fi
    key=${line%%=*}
    value=${line#*=}
    if ! [[ "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || [ "$key" = "$line" ]; then
      echo "${0##*/}: $file line $n is not KEY=value (the line is not shown: it may hold the key)" >&2
      exit 3
    fi
    if [ -z "${!key+set}" ]; then
      export "$key=$value"
    fi
  done < "$file"
}

# export_supervised_db: INGEST_DB as the supervised programs get it (supervisor.d/programs/*.conf
# take supervisord's): the calling environment's, else ./ingest.env's (e.g. a postgresql:// URL,
# docs/postgres.md), else var/ingest.db in the checkout. Call after load_env_file ingest.env.
export_supervised_db() {
  export INGEST_DB="${INGEST_DB:-$PWD/var/ingest.db}"
}
