#!/bin/sh
# The compose example's one-shot set-up, run as root in the regproxy image (sh, curl, coreutils):
#
#   init.sh secrets   before Garage starts: the secrets (made once, random) and the fleet's CA
#   init.sh garage    once Garage answers: layout, keys, bucket, permissions, lifecycle rules
#
# Both are idempotent: every `docker compose up` runs them again, and they keep what is there.
# Garage's admin API v2 (Garage 2.x) does the set-up; `garage` CLI equivalents are in
# docs/shared-tier.md.
set -eu

BUCKET=${BUCKET:-regproxy}
PREFIX=${PREFIX:-fleet}
EXPIRE_DAYS=${EXPIRE_DAYS:-30}
CAPACITY=${CAPACITY:-10000000000}
GARAGE_ADMIN=${GARAGE_ADMIN:-http://garage:3903}
GARAGE_S3=${GARAGE_S3:-http://garage:3900}
FLEET=${FLEET_SECRETS:-/run/secrets/fleet}
GARAGE=${GARAGE_SECRETS:-/run/secrets/garage}
CA=${CA_DIR:-/var/lib/regproxy/ca}
# regproxy's user in its image.
NODE_UID=${NODE_UID:-10001}

# 32 random bytes as 64 hex digits into $1, unless it holds a secret already.
new_secret() {
  [ -s "$1" ] || head -c 32 /dev/urandom | od -An -vtx1 | tr -d ' \n' > "$1"
}

secrets() {
  umask 077
  mkdir -p "$FLEET" "$GARAGE" "$CA"
  for f in rpc-secret admin-token admin-key-secret; do new_secret "$GARAGE/$f"; done
  for f in peer-secret s3-secret; do new_secret "$FLEET/$f"; done
  chmod 0700 "$GARAGE"
  # The nodes read the fleet's secrets and the CA as regproxy's user; nothing else needs them.
  chown -R "$NODE_UID:$NODE_UID" "$FLEET"
  chmod 0500 "$FLEET" && chmod 0400 "$FLEET"/*
  [ -e "$CA/ca.crt" ] || regproxy --ca-dir "$CA" ca init
  chown -R "$NODE_UID:$NODE_UID" "$CA"
  chmod 0644 "$CA/ca.crt"
}

# Garage's admin API: api ENDPOINT [CURL ARGS...]
api() {
  endpoint=$1; shift
  curl -fsS -H "Authorization: Bearer $(cat "$GARAGE/admin-token")" \
    -H 'Content-Type: application/json' "$@" "$GARAGE_ADMIN/v2/$endpoint"
}

# A JSON answer without its white space (Garage pretty-prints).
compact() {
  printf '%s' "$1" | tr -d ' \t\r\n'
}

# The first "id" of a JSON answer: the node in GetClusterStatus, the bucket in GetBucketInfo.
first_id() {
  compact "$1" | grep -o '"id":"[0-9a-f]*"' | head -n 1 | cut -d '"' -f 4
}

# import_key ID SECRET_FILE NAME: a key whose id and secret the nodes (or this script) know.
import_key() {
  api "GetKeyInfo?id=$1" > /dev/null 2>&1 && return 0
  printf '{"accessKeyId":"%s","secretAccessKey":"%s","name":"%s"}' "$1" "$(cat "$2")" "$3" |
    api ImportKey -d @- > /dev/null
}

# allow BUCKET_ID KEY_ID PERMISSIONS_JSON
allow() {
  printf '{"bucketId":"%s","accessKeyId":"%s","permissions":%s}' "$1" "$2" "$3" |
    api AllowBucketKey -d @- > /dev/null
}

garage() {
  : "${FLEET_KEY_ID:?the access key id of the nodes}" "${ADMIN_KEY_ID:?the admin access key id}"
  n=0
  until status=$(api GetClusterStatus 2> /dev/null); do
    n=$((n + 1))
    [ "$n" -lt 60 ] || { echo "init.sh: no answer from Garage at $GARAGE_ADMIN" >&2; exit 1; }
    sleep 1
  done
  case $(compact "$status") in
    *'"layoutVersion":0,'*)
      node=$(first_id "$status")
      api UpdateClusterLayout -d "{\"roles\":[{\"id\":\"$node\",\"zone\":\"dc1\",\"capacity\":$CAPACITY,\"tags\":[]}]}" > /dev/null
      api ApplyClusterLayout -d '{"version":1}' > /dev/null
      echo "init.sh: Garage layout applied (node $node)"
      ;;
  esac
  import_key "$FLEET_KEY_ID" "$FLEET/s3-secret" regproxy-fleet
  import_key "$ADMIN_KEY_ID" "$GARAGE/admin-key-secret" regproxy-admin
  n=0
  until bucket=$(api "GetBucketInfo?globalAlias=$BUCKET" 2> /dev/null ||
    api CreateBucket -d "{\"globalAlias\":\"$BUCKET\"}"); do
    # A layout just applied takes a moment to reach every table.
    n=$((n + 1))
    [ "$n" -lt 30 ] || { echo "init.sh: cannot create bucket $BUCKET" >&2; exit 1; }
    sleep 1
  done
  id=$(first_id "$bucket")
  # The nodes read and write objects; only the admin key may set the bucket's lifecycle.
  allow "$id" "$FLEET_KEY_ID" '{"read":true,"write":true,"owner":false}'
  allow "$id" "$ADMIN_KEY_ID" '{"read":false,"write":false,"owner":true}'
  lifecycle
  echo "init.sh: bucket $BUCKET ready; objects under $PREFIX/ expire $EXPIRE_DAYS days after upload"
}

# regproxy's lifecycle rules, as S3's XML, onto the bucket (Garage wants x-amz-content-sha256;
# curl 7.x signs a bare `?lifecycle` wrongly, `?lifecycle=` right).
lifecycle() {
  auth=$(mktemp)
  printf 'user = "%s:%s"\n' "$ADMIN_KEY_ID" "$(cat "$GARAGE/admin-key-secret")" > "$auth"
  regproxy --shared-store "s3://$BUCKET/$PREFIX" shared-store lifecycle \
    --expire-days "$EXPIRE_DAYS" --xml |
    curl -fsS -K "$auth" --aws-sigv4 aws:amz:garage:s3 -H x-amz-content-sha256:UNSIGNED-PAYLOAD \
      -X PUT --data-binary @- "$GARAGE_S3/$BUCKET?lifecycle="
  rm -f "$auth"
}

case ${1:-} in
  secrets) secrets ;;
  garage) garage ;;
  *) echo "usage: init.sh secrets|garage" >&2; exit 2 ;;
esac
