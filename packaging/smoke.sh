#!/usr/bin/env bash
# Package smoke test (called by .ci/run; needs root, Debian): builds the .debs
# (packaging/build-deb.sh), installs them with dpkg -i, checks the units with
# `systemd-analyze verify`, then starts the installed /usr/bin/mooring as the packaged user
# `mooring` with the packaged /etc/mooring/mooring.toml (only the listen addresses overridden, to
# free loopback ports), creates a device, publishes telemetry over mTLS with mosquitto_pub, reads
# it back through the API with curl, takes a `mooring backup` while it runs, stops it, and purges
# the packages; in between, the installed agent runs as `mooring-agent` with the packaged
# agent.env and delivers one line. systemd need not be running (the server is started directly,
# not by systemctl).
#
# Leaves the machine as it found it: the server it started is stopped, the packages purged, and
# the system users removed if this run created them. Refuses to run where mooring is installed
# (purging would delete that installation's data).
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
step() { echo "== smoke [$(($(date +%s) - started)) s]: $*"; }
fail() {
    echo "smoke: FAILED: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i)"
for package in mooring mooring-agent; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
    if [ -n "$status" ] && [ "$status" != not-installed ]; then
        fail "$package is installed here; this test purges it (and its data): remove it first"
    fi
done
# A hand-made installation without the packages: postinst would adopt these and the purge at the
# end would delete them.
for path in /var/lib/mooring /etc/mooring /var/lib/mooring-agent /etc/mooring-agent; do
    [ ! -e "$path" ] || fail "$path exists; this test would purge it: move it away first"
done

missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v mosquitto_pub >/dev/null || missing+=(mosquitto-clients)
command -v curl >/dev/null || missing+=(curl)
command -v adduser >/dev/null || missing+=(adduser)
if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

step "building the packages"
MOORING_DEB_FAST=1 packaging/build-deb.sh
debs=(target/debian/mooring_*.deb target/debian/mooring-agent_*.deb)
if [ ${#debs[@]} != 2 ] || [ ! -f "${debs[0]}" ] || [ ! -f "${debs[1]}" ]; then
    fail "expected one mooring and one mooring-agent .deb in target/debian/, found: ${debs[*]}"
fi

had_user_mooring=$(getent passwd mooring >/dev/null && echo yes || echo no)
had_user_agent=$(getent passwd mooring-agent >/dev/null && echo yes || echo no)
work=$(mktemp -d)
chmod 0755 "$work"
server_pid=""
cleanup() {
    local status=$?
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    dpkg --purge mooring-agent mooring >/dev/null 2>&1 || true
    if [ "$had_user_mooring" = no ] && getent passwd mooring >/dev/null; then
        deluser --system --quiet mooring >/dev/null 2>&1 || true
    fi
    if [ "$had_user_agent" = no ] && getent passwd mooring-agent >/dev/null; then
        deluser --system --quiet mooring-agent >/dev/null 2>&1 || true
    fi
    if [ $status != 0 ] && [ -f "$work/serve.log" ]; then
        echo "--- server log:" >&2
        cat "$work/serve.log" >&2
    fi
    rm -rf "$work"
    exit $status
}
trap cleanup EXIT

step "dpkg -i ${debs[*]}"
dpkg -i "${debs[@]}"

if [ -d /run/systemd/system ]; then
    # Where systemd runs, the package started mooring.service on the same data dir: stop it, so
    # the server under test is the only one.
    systemctl stop mooring.service
fi

step "checking what the packages installed"
unit_dir=$(dirname "$(dpkg -L mooring | grep '/mooring\.service$')")
for f in /usr/bin/mooring /usr/bin/mooring-agent /etc/mooring/mooring.toml \
    /etc/mooring-agent/agent.toml /etc/mooring-agent/agent.env \
    "$unit_dir/mooring.service" "$unit_dir/mooring-agent.service" \
    /usr/share/man/man1/mooring.1.gz /usr/share/man/man1/mooring-serve.1.gz \
    /usr/share/man/man1/mooring-backup.1.gz /usr/share/man/man1/mooring-agent.1.gz \
    /usr/share/bash-completion/completions/mooring /usr/share/zsh/vendor-completions/_mooring \
    /usr/share/fish/vendor_completions.d/mooring.fish \
    /usr/share/bash-completion/completions/mooring-agent \
    /usr/share/doc/mooring/install.md; do
    [ -f "$f" ] || fail "$f not installed"
done
grep -q '/etc/mooring/mooring.toml' <<<"$(dpkg-query -W -f='${Conffiles}\n' mooring)" ||
    fail "/etc/mooring/mooring.toml is not a conffile"
getent passwd mooring >/dev/null || fail "no system user mooring"
getent passwd mooring-agent >/dev/null || fail "no system user mooring-agent"
[ "$(stat -c '%U %a' /var/lib/mooring)" = "mooring 700" ] ||
    fail "/var/lib/mooring is $(stat -c '%U %a' /var/lib/mooring), not mooring 700"
/usr/bin/mooring --version
/usr/bin/mooring-agent --version

step "systemd-analyze verify"
# --man=no: the Documentation= man pages are not looked up (man-db may be absent).
verify_out=$(systemd-analyze verify --man=no "$unit_dir/mooring.service" \
    "$unit_dir/mooring-agent.service" 2>&1) || fail "systemd-analyze verify: $verify_out"
if [ -n "$verify_out" ]; then
    echo "$verify_out"
    fail "systemd-analyze verify printed warnings"
fi

step "starting the installed server as user mooring with /etc/mooring/mooring.toml"
# setpriv execs (no child process), so $! is the server. Port 0: the kernel picks free ports,
# the server logs them. The log exists before the server starts, so the wait can read it at once.
: >"$work/serve.log"
(cd / && exec setpriv --reuid=mooring --regid=mooring --init-groups -- \
    /usr/bin/mooring serve --config /etc/mooring/mooring.toml \
    --mqtt-addr 127.0.0.1:0 --http-addr 127.0.0.1:0) \
    >"$work/serve.out" 2>"$work/serve.log" &
server_pid=$!
mqtt_port="" http_port=""
deadline=$((SECONDS + 60))
until [ -n "$mqtt_port" ] && [ -n "$http_port" ]; do
    kill -0 "$server_pid" 2>/dev/null || fail "the server exited at start"
    [ $SECONDS -lt $deadline ] || fail "the server did not report its listeners within 60 s"
    mqtt_port=$(sed -n 's/.*MQTT\/TLS listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/serve.log")
    http_port=$(sed -n 's/.*HTTP API listening on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/serve.log")
    if [ -z "$mqtt_port" ] || [ -z "$http_port" ]; then sleep 0.1; fi
done
echo "MQTT/TLS on 127.0.0.1:$mqtt_port, API on 127.0.0.1:$http_port"
[ "$(stat -c '%U %a' /var/lib/mooring/admin.token)" = "mooring 600" ] ||
    fail "admin.token is $(stat -c '%U %a' /var/lib/mooring/admin.token), not mooring 600"
[ "$(ps -o user= -p "$server_pid")" = mooring ] || fail "the server does not run as mooring"

api="http://127.0.0.1:$http_port"
export MOORING_DATA_DIR=/var/lib/mooring
step "mooring device create smoke-1"
/usr/bin/mooring device create smoke-1 --out "$work/smoke-1" --server "$api"

step "mosquitto_pub over mTLS (QoS 1: answered once stored)"
mosquitto_pub -h 127.0.0.1 -p "$mqtt_port" --cafile "$work/smoke-1/ca.crt" \
    --cert "$work/smoke-1/device.crt" --key "$work/smoke-1/device.key" \
    -V mqttv5 -q 1 -i smoke-1 -t devices/smoke-1/telemetry -m '{"temp": 21.5}'

step "reading it back with curl"
token=$(cat /var/lib/mooring/admin.token)
points=$(curl -sSf -H "Authorization: Bearer $token" \
    "$api/api/v1/devices/smoke-1/telemetry?metric=temp")
echo "$points"
grep -q '"value":21.5' <<<"$points" || fail "the point is not in the API's answer"
if grep -q 'Illegal SNI' "$work/serve.log"; then
    fail "the server logged rustls' SNI warning for a device connecting to 127.0.0.1"
fi

step "the installed agent as user mooring-agent with /etc/mooring-agent/agent.env"
install -o mooring-agent -g mooring-agent -m 0600 "$work/smoke-1/device.key" /etc/mooring-agent/
install -m 0644 "$work/smoke-1/device.crt" "$work/smoke-1/ca.crt" /etc/mooring-agent/
echo '{"door": 1}' >"$work/input.jsonl"
chmod 0644 "$work/input.jsonl"
(
    set -a
    # shellcheck disable=SC1091
    . /etc/mooring-agent/agent.env
    set +a
    cd / && exec timeout 60 setpriv --reuid=mooring-agent --regid=mooring-agent --init-groups -- \
        /usr/bin/mooring-agent --server "127.0.0.1:$mqtt_port" --input "$work/input.jsonl" \
        --exit-when-drained
) || fail "the agent did not deliver its input and exit"
points=$(curl -sSf -H "Authorization: Bearer $token" \
    "$api/api/v1/devices/smoke-1/telemetry?metric=door")
echo "$points"
grep -q '"value":1' <<<"$points" || fail "the agent's point is not in the API's answer"

step "mooring backup while the server runs"
/usr/bin/mooring backup --data-dir /var/lib/mooring --out "$work/backup.tar"
# The listing in a variable: `tar | grep -q` would fail under pipefail when grep stops reading.
listing=$(tar -tf "$work/backup.tar")
for f in mooring.db ca.key ca.crt server.key server.crt admin.token; do
    grep -qx "$f" <<<"$listing" || fail "the backup has no $f: $listing"
done

step "stopping the server (SIGTERM)"
kill -TERM "$server_pid"
code=0
wait "$server_pid" || code=$?
server_pid=""
[ $code = 0 ] || fail "the server exited with status $code after SIGTERM"
if pgrep -u mooring >/dev/null; then
    fail "processes of user mooring are still running: $(pgrep -a -u mooring)"
fi

step "dpkg --purge"
dpkg --purge mooring-agent mooring
[ ! -e /var/lib/mooring ] || fail "/var/lib/mooring is still there after purge"
[ ! -e /etc/mooring/mooring.toml ] || fail "/etc/mooring/mooring.toml is still there after purge"
[ ! -e /usr/bin/mooring ] || fail "/usr/bin/mooring is still there after purge"
[ ! -e /etc/mooring-agent ] || fail "/etc/mooring-agent (the device key) is still there after purge"

step "passed"
