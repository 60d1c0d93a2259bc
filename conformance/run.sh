#!/usr/bin/env bash
# MQTT conformance: runs the Eclipse Paho interoperability suites (client_test.py for MQTT 3.1.1,
# client_test5.py for MQTT 5) against `mooring serve --mqtt-dev-addr` and against a private
# Mosquitto, and prints one summary per broker and suite. docs/benchmarks.md records the result.
#
#   conformance/run.sh [--brokers mooring,mosquitto] [--suites 3,5] [--mooring-bin PATH]
#                      [--suite-dir DIR] [--test-timeout SECS] [TEST...]
#
# The suite is not vendored: it comes from $PAHO_TESTING_DIR (or --suite-dir), a checkout of
# github.com/eclipse/paho.mqtt.testing, or is cloned at $PAHO_COMMIT into ~/.cache/mooring.
# Every server gets its own temporary directory and free loopback ports (never 1883/8883/8080);
# both are stopped on exit. Needs python3 (standard library only) and /usr/sbin/mosquitto.
# Exit status: 0 when every test passed on every broker, 1 otherwise, 2 on a setup error.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

PAHO_COMMIT=9d7bb80bb8b9d9cfc0b52f8cb4c1916401281103 # 2024-01-18, the newest on master
brokers=mooring,mosquitto
suites=3,5
mooring_bin=$root/target/debug/mooring
mosquitto_bin=${MOSQUITTO_BIN:-/usr/sbin/mosquitto}
suite_dir=${PAHO_TESTING_DIR:-}
test_timeout=60
tests=()
while (($#)); do
  case $1 in
    --brokers) brokers=$2; shift 2 ;;
    --suites) suites=$2; shift 2 ;;
    --mooring-bin) mooring_bin=$2; shift 2 ;;
    --suite-dir) suite_dir=$2; shift 2 ;;
    --test-timeout) test_timeout=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) tests+=("$1"); shift ;;
  esac
done

die() { echo "conformance: $*" >&2; exit 2; }

if [[ -z $suite_dir ]]; then
  suite_dir=${XDG_CACHE_HOME:-$HOME/.cache}/mooring/paho.mqtt.testing-$PAHO_COMMIT
  if [[ ! -d $suite_dir/interoperability ]]; then
    echo "fetching paho.mqtt.testing $PAHO_COMMIT into $suite_dir"
    tmp_clone=$suite_dir.tmp.$$
    mkdir -p "$(dirname "$suite_dir")"
    if ! git clone -q https://github.com/eclipse/paho.mqtt.testing.git "$tmp_clone" \
        || ! git -C "$tmp_clone" checkout -q "$PAHO_COMMIT"; then
      rm -rf "$tmp_clone"
      die "cannot clone paho.mqtt.testing $PAHO_COMMIT; set PAHO_TESTING_DIR to a checkout"
    fi
    mv "$tmp_clone" "$suite_dir"
  fi
fi
[[ -f $suite_dir/interoperability/client_test5.py ]] \
  || die "$suite_dir is not a paho.mqtt.testing checkout"
suite_commit=$(git -C "$suite_dir" rev-parse HEAD 2>/dev/null || echo "unknown (not a git checkout)")

work=$(mktemp -d "${TMPDIR:-/tmp}/mooring-conformance.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Polls until something accepts on 127.0.0.1:$1, failing if process $2 exits or 30 s pass.
wait_for_port() {
  local port=$1 pid=$2 deadline=$((SECONDS + 30))
  until python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$port" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || return 1
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

start_mooring() {
  [[ -x $mooring_bin ]] || cargo build -q -p mooring
  local dev_port mqtt_port http_port
  dev_port=$(free_port); mqtt_port=$(free_port); http_port=$(free_port)
  "$mooring_bin" serve --data-dir "$work/mooring-data" \
    --mqtt-addr "127.0.0.1:$mqtt_port" --http-addr "127.0.0.1:$http_port" \
    --mqtt-dev-addr "127.0.0.1:$dev_port" >"$work/mooring.log" 2>&1 &
  pids+=($!)
  wait_for_port "$dev_port" $! || { cat "$work/mooring.log" >&2; die "mooring did not start"; }
  port=$dev_port
  version=$("$mooring_bin" --version 2>/dev/null || echo mooring)
}

start_mosquitto() {
  [[ -x $mosquitto_bin ]] || die "no Mosquitto at $mosquitto_bin (Debian package mosquitto)"
  port=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" >"$work/mosquitto.conf"
  "$mosquitto_bin" -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
  pids+=($!)
  wait_for_port "$port" $! || { cat "$work/mosquitto.log" >&2; die "mosquitto did not start"; }
  version=$("$mosquitto_bin" -h 2>/dev/null | head -1 || true)
}

echo "suite: eclipse/paho.mqtt.testing $suite_commit"
status=0
summaries=()
for broker in ${brokers//,/ }; do
  case $broker in
    mooring) start_mooring ;;
    mosquitto) start_mosquitto ;;
    *) die "unknown broker $broker" ;;
  esac
  echo "== $broker ($version) on 127.0.0.1:$port"
  for v in ${suites//,/ }; do
    label="$broker-mqtt${v/3/3.1.1}"
    echo "-- $label"
    if ! python3 "$root/conformance/paho_runner.py" --suite-dir "$suite_dir/interoperability" \
        --version "$v" --port "$port" --label "$label" --log "$work/$label.log" \
        --test-timeout "$test_timeout" ${tests[@]+"${tests[@]}"} \
        2>"$work/$label.stderr" | tee "$work/$label.out"; then
      status=1
      # Keep the failing suite's logs: the work directory is removed on exit.
      mkdir -p "$root/target/conformance"
      cp "$work/$label.log" "$work/$label.stderr" "$root/target/conformance/"
    fi
    summaries+=("$(grep '^SUMMARY' "$work/$label.out" || echo "SUMMARY $label did not finish")")
  done
  kill "${pids[-1]}" 2>/dev/null || true
  wait "${pids[-1]}" 2>/dev/null || true
  if ((status)) && [[ $broker == mooring ]]; then cp "$work/mooring.log" "$root/target/conformance/"; fi
  unset 'pids[-1]'
done

echo
echo "suite commit $suite_commit"
printf '%s\n' "${summaries[@]}"
((status == 0)) || echo "logs of failing suites: $root/target/conformance/"
exit $status
