#!/usr/bin/env bash
# The whole product in one run: a dev key service, a key made with the AWS CLI, an encrypted
# directory mounted with kmsfs, ordinary tools inside it, the ciphertext and xattr header on
# disk, and the audit trail of every open. Cleans up after itself, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

work=$(mktemp -d /tmp/kmsfs-demo.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
creds="$work/credentials.json"
service_pid=""
cleanup() {
    mountpoint -q "$work/plain" 2>/dev/null && kmsfs umount "$work/plain" || true
    [ -n "$service_pid" ] && kill "$service_pid" 2>/dev/null && wait "$service_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

say "starting a dev key service on https://127.0.0.1:$port (data in $work/keyservice)"
keyservice serve --dev --listen "127.0.0.1:$port" --data-dir "$work/keyservice" \
    --credentials-out "$creds" >"$work/keyservice.log" 2>&1 &
service_pid=$!
for _ in $(seq 150); do
    [ -s "$creds" ] && python3 -c "import ssl, urllib.request; urllib.request.urlopen(
        'https://127.0.0.1:$port/healthz', context=ssl.create_default_context(cafile='$work/keyservice/tls/ca.pem'))" \
        >/dev/null 2>&1 && break
    sleep 0.2
done
sed -n '1,20p' "$work/keyservice.log"

# The AWS CLI, unchanged, pointed at our endpoint; TLS verified against the service's private CA.
export AWS_ACCESS_KEY_ID=$(python3 -c "import json;print(json.load(open('$creds'))['access_key_id'])")
export AWS_SECRET_ACCESS_KEY=$(python3 -c "import json;print(json.load(open('$creds'))['secret_access_key'])")
export AWS_DEFAULT_REGION=$(python3 -c "import json;print(json.load(open('$creds'))['region'])")
export AWS_CA_BUNDLE=$(python3 -c "import json;print(json.load(open('$creds'))['ca_bundle'])")
endpoint=$(python3 -c "import json;print(json.load(open('$creds'))['endpoint'])")

say "aws kms create-key + create-alias (the stock AWS CLI)"
key_id=$(aws --endpoint-url "$endpoint" kms create-key --description "kmsfs demo" \
    --query KeyMetadata.KeyId --output text)
aws --endpoint-url "$endpoint" kms create-alias --alias-name alias/demo --target-key-id "$key_id"
aws --endpoint-url "$endpoint" kms list-aliases --output table

say "kmsfs init + mount"
mkdir -p "$work/cipher" "$work/plain"
kmsfs init "$work/cipher" --endpoint "$endpoint" --key alias/demo --credentials "$creds"
kmsfs mount "$work/cipher" "$work/plain" --credentials "$creds"
mount | grep "$work/plain"

say "ordinary tools inside the mount"
echo "attack at dawn" > "$work/plain/hello.txt"
cp /etc/os-release "$work/plain/os-release"
mkdir "$work/plain/docs" && seq 1 20000 > "$work/plain/docs/numbers.txt"
tar -C "$work/plain" -cf "$work/backup.tar" . && tar -tvf "$work/backup.tar"
cat "$work/plain/hello.txt"
wc -l "$work/plain/docs/numbers.txt"
ls -la "$work/plain"

say "on disk: ciphertext only (names too), with the wrapped data key in an xattr header and in the file"
ls -la "$work/cipher"
if grep -rq "attack at dawn" "$work/cipher"; then echo "PLAINTEXT FOUND ON DISK" >&2; exit 1; fi
echo "grep for 'attack at dawn' in $work/cipher: not found (good)"
if find "$work/cipher" -name 'hello*' | grep -q .; then echo "PLAINTEXT NAME FOUND ON DISK" >&2; exit 1; fi
backing=$(kmsfs path encrypt "$work/cipher" /hello.txt --credentials "$creds")
echo "/hello.txt is stored as $backing (kmsfs path encrypt, through the key service)"
od -A d -t x1 "$backing" | head -3
python3 - "$backing" <<'PY'
import os, sys
for name in os.listxattr(sys.argv[1]):
    value = os.getxattr(sys.argv[1], name)
    print(f"xattr {name}: {len(value)} bytes: {value[:48].hex()}...")
PY

say "unmounting"
kmsfs umount "$work/plain"

say "the audit trail: every open of a file is a Decrypt on the service, with path, uid and process"
keyservice audit list --data-dir "$work/keyservice" --operation Decrypt
say "just the opens of /hello.txt"
keyservice audit list --data-dir "$work/keyservice" --file /hello.txt
say "who opened which file, how often, through which key"
keyservice audit files --data-dir "$work/keyservice"

say "disabling the key revokes access: opening a file now fails"
aws --endpoint-url "$endpoint" kms disable-key --key-id "$key_id"
kmsfs mount "$work/cipher" "$work/plain" --credentials "$creds"
if cat "$work/plain/hello.txt" 2>"$work/err"; then echo "read succeeded with a disabled key" >&2; exit 1; fi
echo "cat hello.txt: $(cat "$work/err")"
kmsfs umount "$work/plain"
keyservice audit list --data-dir "$work/keyservice" --file /hello.txt | tail -n 2

say "stopping the key service (it seals the audit log with a signed checkpoint)"
kill "$service_pid" && wait "$service_pid" 2>/dev/null || true
service_pid=""
say "the audit log verifies: hash chain, signed checkpoints, head"
keyservice audit verify --data-dir "$work/keyservice"
say "demo finished"
