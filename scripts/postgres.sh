#!/usr/bin/env bash
# scripts/postgres.sh - a throwaway PostgreSQL server for the tests, on 127.0.0.1 only.
#
#   bash scripts/postgres.sh up      # idempotent; prints PG_* KEY=value lines (stdout)
#   bash scripts/postgres.sh down    # stop the server (the cluster and its data stay, for a fast next up)
#   bash scripts/postgres.sh purge   # stop it and remove the cluster and its data
#   bash scripts/postgres.sh status  # exit 0 when it is running
#
# Debian/Ubuntu, as root: installs the apt package `postgresql` if missing and runs a cluster of
# its own (pg_createcluster / pg_ctlcluster; no systemd needed) with its data in $PG_STATE_DIR,
# and a role owning a database (each test makes a schema of its own there). Durability is switched
# off (fsync, synchronous_commit): never point a real portal at it.
# Progress goes to stderr; stdout of `up` is only the env lines, so  eval "$(bash scripts/postgres.sh up)"  works.
set -euo pipefail

STATE_DIR=${PG_STATE_DIR:-/var/tmp/playr-pg}
CLUSTER=${PG_CLUSTER:-playr-test}
# Below the kernel's ephemeral range (32768-60999 here): a port in it can be taken at any moment
# as the local end of some outgoing connection, and the server would then fail to bind.
FIRST_PORT=${PG_PORT:-15432}
DB_USER=playr
DB_NAME=playr
DATA_DIR=$STATE_DIR/data
SOCKET_DIR=$STATE_DIR/run
LOG_FILE=$STATE_DIR/postgresql.log
PASSWORD_FILE=$STATE_DIR/password
ENV_FILE=$STATE_DIR/postgres.env

log() { printf '[postgres] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (it installs postgresql and runs it as the postgres user)"; }

lock_state() {
    mkdir -p "$STATE_DIR"
    chmod 0755 "$STATE_DIR"
    exec 9>"$STATE_DIR/.lock"
    flock -w 120 9 || die "another postgres.sh holds $STATE_DIR/.lock"
}

# ---------------------------------------------------------------- packages
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_CREATED=0
cleanup() {
    if [[ $POLICY_CREATED -eq 1 ]]; then
        rm -f "$POLICY_RC"
        POLICY_CREATED=0
    fi
}
trap cleanup EXIT

ensure_packages() {
    command -v pg_createcluster >/dev/null && compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null && return 0
    command -v apt-get >/dev/null || die "postgresql is not installed and there is no apt-get to install it"
    log "installing postgresql"
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || apt-get update -q >&2
    # No init system here: policy-rc.d exit 101 ("action forbidden") keeps the package's
    # maintainer scripts from trying to start the default cluster.
    if [[ ! -e $POLICY_RC ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
        chmod 0755 "$POLICY_RC"
        POLICY_CREATED=1
    fi
    local -a apt=(apt-get install -y -q --no-install-recommends
                  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" postgresql >&2; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" postgresql >&2
    fi
    cleanup
}

newest_version() {
    local dir
    dir=$(compgen -G '/usr/lib/postgresql/*/bin/postgres' | sort -V | tail -n1) || true
    [[ -n $dir ]] || die "no PostgreSQL server binary under /usr/lib/postgresql"
    basename "$(dirname "$(dirname "$dir")")"
}

# our cluster as "version port status", or nothing
cluster_line() {
    pg_lsclusters -h 2>/dev/null | awk -v name="$CLUSTER" '$2 == name { print $1, $3, $4; exit }'
}

port_free() {
    if command -v ss >/dev/null; then
        [[ -z $(ss -Hltn "sport = :$1") ]]
    else
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 1; fi
    fi
}

choose_port() {
    local port=$FIRST_PORT
    while ! port_free "$port"; do
        port=$((port + 1))
        ((port < FIRST_PORT + 100)) || die "no free port in $FIRST_PORT..$((FIRST_PORT + 99))"
    done
    echo "$port"
}

ensure_cluster() {
    local line version port
    line=$(cluster_line)
    if [[ -n $line && ! -f $DATA_DIR/PG_VERSION ]]; then
        log "cluster $CLUSTER has lost its data directory; recreating it"
        pg_dropcluster --stop "${line%% *}" "$CLUSTER" >&2 || true
        line=
    fi
    if [[ -z $line ]]; then
        version=$(newest_version)
        port=$(choose_port)
        log "creating cluster $version/$CLUSTER on 127.0.0.1:$port (data in $DATA_DIR)"
        rm -rf "$DATA_DIR" "$SOCKET_DIR"
        install -d -o postgres -g postgres -m 0700 "$SOCKET_DIR"
        touch "$LOG_FILE" && chown postgres:postgres "$LOG_FILE"
        pg_createcluster --quiet --start-conf=manual -u postgres -d "$DATA_DIR" -s "$SOCKET_DIR" \
            -l "$LOG_FILE" -p "$port" "$version" "$CLUSTER" -- \
            --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >&2
        # Debian's postgresql.conf reads conf.d/: loopback only, room for several portal instances
        # per test, and no durability (a test server: speed matters, a crash loses nothing).
        cat >"/etc/postgresql/$version/$CLUSTER/conf.d/playr-test.conf" <<'CONF'
listen_addresses = '127.0.0.1'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
    fi
}

# A server killed without a chance to clean up (the machine's processes ended between two runs)
# leaves postmaster.pid and its socket's lock file behind; while that pid exists (reused, or a
# zombie nobody reaps where PID 1 is no init) PostgreSQL refuses to start.
remove_stale_pid_file() {
    local pid_file=$DATA_DIR/postmaster.pid pid state stale=()
    if [[ -f $pid_file ]]; then
        pid=$(head -n1 "$pid_file" | tr -dc '0-9')
        if [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == postgres ]]; then
            state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || state=
            [[ $state == Z ]] || return 0  # a live server: pg_ctlcluster will say what it is
        fi
        stale+=("$pid_file")
    fi
    mapfile -t -O "${#stale[@]}" stale < <(compgen -G "$SOCKET_DIR/.s.PGSQL.*" || true)
    [[ ${#stale[@]} -gt 0 ]] || return 0
    log "removing what a server that is no longer running left behind: ${stale[*]}"
    rm -f "${stale[@]}"
}

psql_admin() {
    local version port
    read -r version port _ <<<"$(cluster_line)"
    runuser -u postgres -- psql -X -q -At -v ON_ERROR_STOP=1 -h "$SOCKET_DIR" -p "$port" -d postgres "$@"
}

cmd_up() {
    need_root
    lock_state
    local started line version port status password
    started=$(date +%s.%N)
    ensure_packages
    ensure_cluster
    read -r version port status <<<"$(cluster_line)"
    if [[ $status != online ]] && { ! port_free "$port" || ((port >= 32768)); }; then
        local moved
        moved=$(choose_port)
        log "port $port is taken or ephemeral; moving cluster $version/$CLUSTER to $moved"
        pg_conftool "$version" "$CLUSTER" set port "$moved"
        port=$moved
    fi
    if [[ $status != online ]]; then
        log "starting cluster $version/$CLUSTER"
        install -d -o postgres -g postgres -m 0700 "$SOCKET_DIR"
        install -d -o postgres -g postgres -m 2775 /var/run/postgresql  # pg_ctlcluster's pid file
        remove_stale_pid_file
        # 9>&-: the server must not inherit (and so hold for ever) this script's lock
        pg_ctlcluster "$version" "$CLUSTER" start 9>&- >&2 || { tail -n 20 "$LOG_FILE" >&2; die "the server did not start"; }
    fi
    if [[ ! -s $PASSWORD_FILE ]]; then
        (umask 077; head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$PASSWORD_FILE")
    fi
    password=$(cat "$PASSWORD_FILE")
    psql_admin -v user="$DB_USER" -v password="$password" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN CREATEDB', :'user')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'user') \gexec
SELECT format('ALTER ROLE %I PASSWORD %L', :'user', :'password') \gexec
SQL
    psql_admin -v user="$DB_USER" -v db="$DB_NAME" <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'user')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SQL
    {
        echo "PG_VERSION=$version"
        echo "PG_HOST=127.0.0.1"
        echo "PG_PORT=$port"
        echo "PG_USER=$DB_USER"
        echo "PG_PASSWORD=$password"
        echo "PG_DATABASE=$DB_NAME"
        echo "PG_URL=postgresql+psycopg://$DB_USER:$password@127.0.0.1:$port/$DB_NAME"
    } >"$ENV_FILE.new"
    chmod 0600 "$ENV_FILE.new"
    mv "$ENV_FILE.new" "$ENV_FILE"
    cat "$ENV_FILE"
    log "up in $(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
}

cmd_down() {
    need_root
    lock_state
    local version port status
    read -r version port status <<<"$(cluster_line)"
    if [[ ${status:-} == online ]]; then
        log "stopping cluster $version/$CLUSTER"
        pg_ctlcluster "$version" "$CLUSTER" stop -m fast >&2
    fi
    rm -f "$ENV_FILE"
}

cmd_purge() {
    cmd_down
    local version
    read -r version _ <<<"$(cluster_line)"
    if [[ -n ${version:-} ]]; then
        log "removing cluster $version/$CLUSTER"
        pg_dropcluster "$version" "$CLUSTER" >&2
    fi
    rm -rf "$DATA_DIR" "$SOCKET_DIR" "$PASSWORD_FILE" "$LOG_FILE"
}

cmd_status() {
    local version port status
    command -v pg_lsclusters >/dev/null || { echo "postgresql: not installed"; return 1; }
    read -r version port status <<<"$(cluster_line)"
    if [[ -z ${version:-} ]]; then
        echo "cluster $CLUSTER: not created"
        return 1
    fi
    echo "cluster $version/$CLUSTER: $status (127.0.0.1:$port, data in $DATA_DIR)"
    [[ $status == online ]]
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    purge) cmd_purge ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|purge|status" >&2; exit 2 ;;
esac
