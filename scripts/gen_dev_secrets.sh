#!/bin/sh
# Secrets for deploy/compose.yaml, written to deploy/secrets/ (git-ignored):
#   mosquitto/  ca.crt server.crt server.key (dev CA, scripts/gen_dev_certs.sh) and passwd
#               (Mosquitto password file: user `worker` with a random password)
#   worker/     ca.crt, mqtt.password, redis.password (read by the workers' *_password_file)
#   redis/      users.acl (brokers/redis/users.acl.example with a random password for `iw`)
#   ca/         ca.key, client.crt/.key: to sign more certificates; mounted nowhere
# Devices get their own Mosquitto users: mosquitto_passwd deploy/secrets/mosquitto/passwd
# sensor-7 (prompts), then restart mosquitto. Re-running replaces every secret.
# Needs openssl, and mosquitto_passwd on PATH or docker (eclipse-mosquitto image).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
s="$root/deploy/secrets"
umask 077
mkdir -p "$s/mosquitto" "$s/worker" "$s/redis" "$s/ca"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$root/scripts/gen_dev_certs.sh" "$tmp" "mosquitto,redis,kafka,localhost,127.0.0.1"
cp "$tmp/ca.crt" "$tmp/server.crt" "$tmp/server.key" "$s/mosquitto/"
cp "$tmp/ca.crt" "$s/worker/"
cp "$tmp/ca.key" "$tmp/client.crt" "$tmp/client.key" "$s/ca/"

worker_pw=$(openssl rand -hex 24)
redis_pw=$(openssl rand -hex 24)
printf '%s\n' "$worker_pw" > "$s/worker/mqtt.password"
printf '%s\n' "$redis_pw" > "$s/worker/redis.password"
sed "s/>CHANGE_ME />$redis_pw /" "$root/brokers/redis/users.acl.example" > "$s/redis/users.acl"
rm -f "$s/mosquitto/passwd"
if command -v mosquitto_passwd >/dev/null 2>&1; then
  mosquitto_passwd -c -b "$s/mosquitto/passwd" worker "$worker_pw"
else
  docker run --rm -v "$s/mosquitto:/m" eclipse-mosquitto:2 \
    mosquitto_passwd -c -b /m/passwd worker "$worker_pw"
fi
# The broker containers run as their own users (mosquitto uid 1883, redis 999): let them
# read their files. Dev only: in production mount secrets with the right owner instead.
chmod 755 "$s/mosquitto" "$s/worker" "$s/redis"
chmod 644 "$s/mosquitto"/* "$s/worker"/* "$s/redis"/*
echo "wrote deploy/secrets/ (worker MQTT user: worker; Redis user: iw)"
