#!/bin/bash
# The Debian package, end to end, on this Debian 12 machine (as root; `make deb-check` runs it):
#   1. build the .deb from a copy of the tree (dpkg-buildpackage -us -uc -b) and lint it (no errors);
#   2. check the unit: systemd-analyze security --offline (exposure <= 3.0) and verify;
#   3. install it with apt-get install ./sentrypeer_*.deb, pulling Debian's python3-twisted & co;
#   4. run the unit's ExecStart with its environment file as the user sentrypeer, in a private
#      mount namespace approximating the unit's sandbox (read-only /, writable state and log
#      directories, private /tmp, hidden homes), without touching the host's mounts;
#   5. probe it with sipsak (SIP OPTIONS over UDP) and find the event in the database, the JSON log
#      and the REST API on loopback; ssh into the manhole (when the build has one);
#   6. stop it, purge the package and check that nothing is left.
# Everything it creates lives in a temporary directory, removed at exit; an installed package is
# purged at exit whatever happened.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
# Debian's own tools and Python only (not a pyenv or virtualenv python3 earlier on PATH).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
unset PYTHONPATH VIRTUAL_ENV
# Not in the checkout: python3 -c and twistd3 put the working directory on sys.path, and the
# checkout's own sentrypeer/ and twisted/plugins/ would stand in for the installed ones.
cd /

STATE=/var/lib/sentrypeer
LOGS=/var/log/sentrypeer
ETC=/etc/sentrypeer
UNIT=/lib/systemd/system/sentrypeer.service
API=http://127.0.0.1:8082
MANHOLE_PORT=2222
WORK=$(mktemp -d /tmp/sentrypeer-deb-check.XXXXXX)
DAEMON_PID=
INSTALLED=0

say() { echo "deb-check: $*"; }
fail() {
    echo "deb-check: FAILED: $*" >&2
    if [ -s "$WORK/daemon.log" ]; then
        echo "---- daemon log (last 40 lines) ----" >&2
        tail -n 40 "$WORK/daemon.log" >&2
    fi
    exit 1
}

stop_daemon() {
    [ -n "$DAEMON_PID" ] || return 0
    local pid=$DAEMON_PID status=0
    DAEMON_PID=
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        return 124
    fi
    wait "$pid" 2>/dev/null || status=$?
    return "$status"
}

cleanup() {
    local status=$?
    stop_daemon >/dev/null 2>&1 || true
    if [ "$INSTALLED" = 1 ] && [ "$(package_status)" != not-installed ]; then
        say "cleaning up: purging sentrypeer"
        apt-get purge -y -qq sentrypeer >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

package_status() {
    local s
    s=$(dpkg-query -W -f='${db:Status-Status}' sentrypeer 2>/dev/null || true)
    echo "${s:-not-installed}"
}

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every 0.2 s until it succeeds.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [ -n "$DAEMON_PID" ] && ! kill -0 "$DAEMON_PID" 2>/dev/null; then
            fail "the daemon exited while waiting for $what"
        fi
        [ "$SECONDS" -lt "$deadline" ] || fail "no $what within ${seconds}s"
        sleep 0.2
    done
}

[ "$(id -u)" = 0 ] || fail "run as root (it installs and purges the package)"
# Never clobber a real installation: this check installs, then purges, the package.
[ "$(package_status)" = not-installed ] ||
    fail "sentrypeer is already installed here ($(package_status)); purge it first (apt-get purge sentrypeer)"
for path in "$STATE" "$LOGS" "$ETC"; do
    [ ! -e "$path" ] || fail "$path exists already; this check would delete it when it purges the package"
done
! getent passwd sentrypeer >/dev/null || fail "the user sentrypeer exists already"
for tool in dpkg-buildpackage lintian systemd-analyze sipsak sqlite3 curl unshare setpriv ssh ssh-keygen; do
    command -v "$tool" >/dev/null || fail "$tool is missing (make deb-deps installs it)"
done

# -- 1. build and lint --------------------------------------------------------------------------
say "building the package"
DEB=$("$HERE/build-deb.sh" "$WORK/out")
say "built $(basename "$DEB")"
say "lintian"
lint=0
lintian --fail-on error "$WORK"/out/*.changes >"$WORK/lintian.log" 2>&1 || lint=$?
grep -v 'running with root privileges' "$WORK/lintian.log" || true
[ "$lint" = 0 ] || fail "lintian reports errors (status $lint)"

# -- 2. the unit, as shipped --------------------------------------------------------------------
say "systemd-analyze security --offline=true --threshold=30"
cp "$SRC/debian/sentrypeer.service" "$WORK/sentrypeer.service"
systemd-analyze security --offline=true --threshold=30 "$WORK/sentrypeer.service" | tail -n 1 \
    || fail "the unit's exposure is above 3.0"

# -- 3. install ---------------------------------------------------------------------------------
say "apt-get install $(basename "$DEB")"
INSTALLED=1
apt-get install -y -qq "$DEB" >"$WORK/install.log" 2>&1 || { cat "$WORK/install.log" >&2; fail "install"; }
[ "$(package_status)" = installed ] || fail "the package is not installed after apt-get install"
if [ -d /run/systemd/system ]; then
    # A machine booted with systemd started the service on installation: stop it, the run below
    # needs its ports.
    systemctl stop sentrypeer.service || true
fi
say "systemd-analyze verify $UNIT"
systemd-analyze verify "$UNIT" || fail "systemd-analyze verify $UNIT"
getent passwd sentrypeer >/dev/null || fail "postinst did not create the user sentrypeer"
/usr/bin/python3 -c 'from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker
assert [m for m in getPlugins(IServiceMaker) if m.tapname == "sentrypeer"]' \
    || fail "twistd3 does not find the sentrypeer plugin"
twistd3 sentrypeer --help >/dev/null || fail "twistd3 sentrypeer --help"
[ "$(sentrypeer -V)" = "sentrypeer $(dpkg-query -W -f='${Version}' sentrypeer | sed 's/-[^-]*$//')" ] \
    || fail "sentrypeer -V does not print the package's version"

# -- 4. run ExecStart as the unit would ---------------------------------------------------------
exec_start=$(sed -n 's/^ExecStart=//p' "$UNIT")
workdir=$(sed -n 's/^WorkingDirectory=//p' "$UNIT")
user=$(sed -n 's/^User=//p' "$UNIT")
nofile=$(sed -n 's/^LimitNOFILE=//p' "$UNIT")
[ -n "$exec_start" ] && [ -n "$workdir" ] && [ -n "$user" ] && [ -n "$nofile" ] || fail "cannot read $UNIT"
# systemd creates these (StateDirectory=, LogsDirectory=); postinst did already, for non-systemd runs.
[ "$(stat -c %U "$STATE")" = "$user" ] && [ "$(stat -c %U "$LOGS")" = "$user" ] ||
    fail "$STATE and $LOGS are not owned by $user"

# An operator's manhole key, as README.Debian says to set it up.
ssh-keygen -q -t ed25519 -N '' -C deb-check -f "$WORK/operator"
ssh-keygen -q -t ed25519 -N '' -C stranger -f "$WORK/stranger"
install -m 640 -g sentrypeer "$WORK/operator.pub" "$ETC/manhole_authorized_keys"

cat >"$WORK/sandbox.sh" <<'EOF'
# Inside `unshare -m --propagation private`: nothing here reaches the host's mounts.
set -eu
for dir in "$STATE" "$LOGS"; do mount --bind "$dir" "$dir"; done   # ReadWritePaths: stay writable
mount -o remount,bind,ro /                                          # ProtectSystem=strict
for dir in /tmp /var/tmp; do mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$dir"; done  # PrivateTmp
for dir in /home /root /run/user; do                                # ProtectHome
    if [ -d "$dir" ]; then mount -t tmpfs -o ro,mode=0755 tmpfs "$dir"; fi
done
# LimitNOFILE, or the hard limit where this machine caps it lower (a container may).
ulimit -n "$NOFILE" 2>/dev/null || ulimit -n "$(ulimit -H -n)"
cd "$WORKDIR"                                                       # WorkingDirectory
exec setpriv --reuid="$RUN_USER" --regid="$RUN_USER" --init-groups --no-new-privs \
    --bounding-set=-all --inh-caps=-all -- \
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        HOME="$WORKDIR" USER="$RUN_USER" LOGNAME="$RUN_USER" SHELL=/usr/sbin/nologin \
        STATE_DIRECTORY="$STATE" LOGS_DIRECTORY="$LOGS" SENTRYPEER_MANHOLE="$MANHOLE" \
        /bin/sh -c 'set -a; . /etc/default/sentrypeer; set +a; exec '"$EXEC_START"
EOF
# The packaged defaults listen on fixed ports. On a shared machine another program (a scanner's
# test run) may hold one for a moment: wait for them, and start again if a bind still lost the race.
ports_free() {
    [ -z "$(ss -Hlntu "( sport = :5060 or sport = :5061 or sport = :8082 or sport = :$MANHOLE_PORT )")" ]
}
api_up() { curl -fsS "$API/health-check"; }
for attempt in 1 2 3 4 5; do
    DAEMON_PID=
    wait_for 60 "free ports 5060, 5061, 8082 and $MANHOLE_PORT" ports_free
    say "starting: $exec_start (as $user, read-only /, environment file /etc/default/sentrypeer)"
    STATE=$STATE LOGS=$LOGS NOFILE=$nofile WORKDIR=$workdir RUN_USER=$user EXEC_START=$exec_start \
        MANHOLE="tcp:$MANHOLE_PORT:interface=127.0.0.1" \
        unshare -m --propagation private -- /bin/sh "$WORK/sandbox.sh" >"$WORK/daemon.log" 2>&1 &
    DAEMON_PID=$!
    deadline=$((SECONDS + 60))
    until api_up >/dev/null 2>&1 || ! kill -0 "$DAEMON_PID" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; do
        sleep 0.2
    done
    api_up >/dev/null 2>&1 && break
    if ! kill -0 "$DAEMON_PID" 2>/dev/null && [ "$attempt" -lt 5 ] &&
        grep -q 'Address already in use' "$WORK/daemon.log"; then
        wait "$DAEMON_PID" 2>/dev/null || true
        say "a port was taken meanwhile: $(grep -m1 'Address already in use' "$WORK/daemon.log" | sed 's/.*] //')"
        sleep 2
        continue
    fi
    fail "the daemon did not answer on $API/health-check"
done
grep -q 'listening for SIP on UDP' "$WORK/daemon.log" || fail "no SIP UDP listener in the log"
[ "$(stat -c %U "/proc/$DAEMON_PID")" = "$user" ] || fail "the daemon does not run as $user"
grep -q '^NoNewPrivs:[[:space:]]*1' "/proc/$DAEMON_PID/status" || fail "NoNewPrivs is not set"
grep -q '^CapEff:[[:space:]]*0*$' "/proc/$DAEMON_PID/status" || fail "the daemon has capabilities"
say "running as $user (pid $DAEMON_PID), no capabilities, root file system read-only"

# -- 5. probe -----------------------------------------------------------------------------------
number="9$(date +%s)"
say "sipsak OPTIONS to sip:$number@127.0.0.1:5060 (UDP)"
timeout 30 sipsak -D 2 -s "sip:$number@127.0.0.1:5060" >"$WORK/sipsak.log" 2>&1 || true

query="SELECT count(*) FROM honey WHERE called_number = '$number' AND method = 'OPTIONS'
       AND transport_type = 'UDP' AND source_ip = '127.0.0.1' AND user_agent LIKE 'sipsak%'"
db_has_row() { [ "$(runuser -u sentrypeer -- sqlite3 "$STATE/sentrypeer.db" "$query")" -ge 1 ]; }
wait_for 20 "row for $number in $STATE/sentrypeer.db" db_has_row
say "database: the OPTIONS row is in $STATE/sentrypeer.db"

json_has_line() { grep -F "\"called_number\":\"$number\"" "$LOGS/sentrypeer.json" | grep -qF '"sip_method":"OPTIONS"'; }
wait_for 20 "line for $number in $LOGS/sentrypeer.json" json_has_line
say "JSON log: the event is in $LOGS/sentrypeer.json"

curl -fsS "$API/numbers/$number" >"$WORK/api-number.json" || fail "GET $API/numbers/$number"
grep -qF "$number" "$WORK/api-number.json" || fail "the API does not know $number: $(cat "$WORK/api-number.json")"
curl -fsS "$API/ip-addresses/127.0.0.1" >"$WORK/api-ip.json" || fail "GET $API/ip-addresses/127.0.0.1"
grep -qF '127.0.0.1' "$WORK/api-ip.json" || fail "the API does not know 127.0.0.1: $(cat "$WORK/api-ip.json")"
say "API: $API/numbers/$number and /ip-addresses/127.0.0.1 answer with the event"

[ -s "$STATE/cert.pem" ] && [ "$(stat -c %a "$STATE/key.pem")" = 600 ] ||
    fail "no TLS pair (key mode 0600) generated in $STATE"
say "TLS: self-signed pair generated in $STATE (key mode 0600)"

# ssh_manhole KEY [SSH ARGS...]: ssh into the manhole as README.Debian shows (the user's ssh_config
# applies: Debian's sends LANG and LC_* as environment requests).
ssh_manhole() {
    local key=$1
    shift
    timeout 20 ssh -p "$MANHOLE_PORT" -i "$key" -o BatchMode=yes -o IdentitiesOnly=yes \
        -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile="$WORK/known_hosts" -o LogLevel=ERROR \
        "$@"
}
grep -q 'SSH manhole listening' "$WORK/daemon.log" || fail "the daemon did not start the manhole"
# The one-off reading of README.Debian: the repr of the expression, exit status 0.
status=0
ssh_manhole "$WORK/operator" operator@127.0.0.1 'sip.stats.total("received")' >"$WORK/manhole.out" 2>&1 ||
    status=$?
[ "$status" = 0 ] && grep -qxE '[1-9][0-9]*' "$WORK/manhole.out" ||
    fail "ssh operator@127.0.0.1 'sip.stats.total(\"received\")' (status $status) did not print the live counter: $(tail -c 400 "$WORK/manhole.out")"
# A scripted interactive session ends with exit status 0 at the end of its input, and at exit().
status=0
printf '%s\r' 'print("received=%d" % sip.stats.total("received"))' |
    ssh_manhole "$WORK/operator" -tt operator@127.0.0.1 >"$WORK/manhole-tt.raw" 2>&1 || status=$?
tr -d '\r\033' <"$WORK/manhole-tt.raw" >"$WORK/manhole-tt.out"
[ "$status" = 0 ] && grep -qE '^received=[1-9][0-9]*' "$WORK/manhole-tt.out" ||
    fail "printf '...\\r' | ssh -tt (status $status, not 0) did not show the live counter: $(tail -c 400 "$WORK/manhole-tt.out")"
status=0
printf 'exit()\r' | ssh_manhole "$WORK/operator" -tt operator@127.0.0.1 >"$WORK/manhole-exit.out" 2>&1 || status=$?
[ "$status" = 0 ] || fail "exit() in the manhole: ssh exit status $status, not 0"
if ssh_manhole "$WORK/stranger" operator@127.0.0.1 '1' >"$WORK/stranger.out" 2>&1; then
    fail "the manhole let in a key that is not authorized"
fi
[ "$(stat -c %a "$STATE/manhole_host_key")" = 600 ] || fail "manhole host key is not mode 0600"
host_key=$(ssh-keygen -lf "$STATE/manhole_host_key") || fail "ssh-keygen cannot read $STATE/manhole_host_key"
case $host_key in *"(ED25519)") ;; *) fail "the manhole host key is not Ed25519: $host_key" ;; esac
grep -qF "host key $(echo "$host_key" | cut -d' ' -f2))" "$WORK/daemon.log" ||
    fail "the daemon log does not show the host key's fingerprint $(echo "$host_key" | cut -d' ' -f2)"
# One line per login, one for the refused key (once the server has seen the client go), none of
# conch's chatter.
[ "$(grep -c "manhole login: user 'operator' from 127.0.0.1:" "$WORK/daemon.log")" = 3 ] ||
    fail "not one log line per manhole login: $(grep 'manhole login' "$WORK/daemon.log")"
refusal_logged() { grep -q "manhole login refused: user 'operator' from 127.0.0.1:" "$WORK/daemon.log"; }
wait_for 10 "log line of the refused manhole login" refusal_logged
if grep -E 'twisted[./]conch|disconnected by user|moduli|environment variable|Unhandled Error' "$WORK/daemon.log"; then
    fail "the manhole's log has conch's chatter or an error (above)"
fi
say "manhole: ssh on 127.0.0.1:$MANHOLE_PORT read sip.stats live (exit status 0); an unknown key was refused; Ed25519 host key; quiet log"

# -- 6. stop, purge, nothing left ---------------------------------------------------------------
say "stopping the daemon (SIGTERM)"
status=0
stop_daemon || status=$?
case $status in 0 | 143) ;; *) fail "the daemon exited with status $status on SIGTERM" ;; esac
grep -q 'SentryPeer stopped' "$WORK/daemon.log" || fail "no clean-stop line in the daemon log"
if grep -qE 'Traceback|#critical\]' "$WORK/daemon.log"; then
    fail "the daemon log has a traceback or critical error"
fi

dpkg -L sentrypeer | sort >"$WORK/files"
say "apt-get purge sentrypeer"
apt-get purge -y -qq sentrypeer >"$WORK/purge.log" 2>&1 || { cat "$WORK/purge.log" >&2; fail "purge"; }
INSTALLED=0
[ "$(package_status)" = not-installed ] || fail "the package is still known to dpkg: $(package_status)"
left=""
while read -r path; do
    if [ -e "$path" ] && [ ! -d "$path" ]; then left="$left $path"; fi
done <"$WORK/files"
for path in "$STATE" "$LOGS" "$ETC" /etc/default/sentrypeer /etc/logrotate.d/sentrypeer \
    /usr/lib/python3/dist-packages/sentrypeer /usr/share/doc/sentrypeer \
    /etc/systemd/system/multi-user.target.wants/sentrypeer.service /var/lib/systemd/deb-systemd-helper-enabled/sentrypeer.service; do
    if [ -e "$path" ]; then left="$left $path"; fi
done
for path in /usr/lib/python3/dist-packages/twisted/plugins/__pycache__/sentrypeer_plugin*; do
    if [ -e "$path" ]; then left="$left $path"; fi
done
[ -z "$left" ] || fail "left after purge:$left"
! getent passwd sentrypeer >/dev/null || fail "the user sentrypeer is left after purge"
! getent group sentrypeer >/dev/null || fail "the group sentrypeer is left after purge"
say "purged: no files, directories, user or group left"
say "OK"
