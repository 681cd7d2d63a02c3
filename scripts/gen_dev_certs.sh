#!/bin/sh
# Development TLS material for Mosquitto, Redis and Kafka, made with the openssl CLI.
#
#   scripts/gen_dev_certs.sh OUT_DIR [HOSTS]
#
# HOSTS: comma-separated DNS names / IPs the server certificate is valid for (hostname
# verification is on in every client); default: mosquitto,redis,kafka,localhost,127.0.0.1.
# Writes into OUT_DIR: ca.crt ca.key (dev CA, 825 days), server.crt server.key (serverAuth,
# SANs = HOSTS), client.crt client.key (clientAuth, CN=worker: for mutual TLS).
# Never use these in production: the CA key sits next to the certificates. Existing files
# are overwritten.
set -eu
out=${1:?usage: gen_dev_certs.sh OUT_DIR [HOSTS]}
hosts=${2:-mosquitto,redis,kafka,localhost,127.0.0.1}
mkdir -p "$out"
cd "$out"

san=""
for h in $(echo "$hosts" | tr ',' ' '); do
  case "$h" in
    *[!0-9.]*) entry="DNS:$h" ;;
    *) entry="IP:$h" ;;
  esac
  san="${san:+$san,}$entry"
done

openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 825 \
  -keyout ca.key -out ca.crt -subj "/CN=inference-worker dev CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  2>/dev/null

sign() {  # sign NAME CN EXTFILE-CONTENT
  openssl req -newkey rsa:2048 -nodes -sha256 -keyout "$1.key" -out "$1.csr" \
    -subj "/CN=$2" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
    -sha256 -out "$1.crt" -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

sign server "$(echo "$hosts" | cut -d, -f1)" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san"
sign client worker "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
rm -f ca.srl
# Keys readable by the owner only; the broker containers read them as the file owner's
# uid or need them group-readable: adjust for your deployment.
chmod 600 ca.key client.key
chmod 644 server.key ca.crt server.crt client.crt
echo "wrote CA, server (SAN $san) and client certificates to $out"
