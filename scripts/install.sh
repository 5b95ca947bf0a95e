#!/usr/bin/env bash
# scripts/install.sh - install, upgrade or remove the PlayrServers QEMU Management Portal on a
# Debian/Ubuntu server: a system user, the code and a virtual environment in APP_DIR, a data
# directory, /etc/manage-playrservers.env, the systemd unit manage-playrservers and an nginx site.
#
#   sudo ./scripts/install.sh                      install, or upgrade in place (safe to re-run)
#   sudo ./scripts/install.sh --uninstall          remove code, unit and site; keep data + env file
#   sudo ./scripts/install.sh --uninstall --purge  remove everything, the data and the user too
#
# Run ./scripts/install.sh --help for the variables. Operations guide: docs/operations.md.
set -euo pipefail
umask 022

APP_NAME=manage-playrservers
APP_REPO=${APP_REPO:-}
APP_BRANCH=${APP_BRANCH:-main}
APP_DIR=${APP_DIR:-/opt/manage.playrservers}
APP_DOMAIN=${APP_DOMAIN:-manage.playrservers.com}
APP_PORT_SET=${APP_PORT:+1}
APP_PORT=${APP_PORT:-8000}
INSTALL_NGINX=${INSTALL_NGINX:-1}
APP_USER=${APP_USER:-$APP_NAME}
APP_DATA_DIR=${APP_DATA_DIR:-/var/lib/$APP_NAME}
APP_ENV_FILE=${APP_ENV_FILE:-/etc/$APP_NAME.env}
NGINX_LISTEN=${NGINX_LISTEN:-80 [::]:80}
PYTHON=${PYTHON:-/usr/bin/python3}
APP_ADMIN_NAME=${APP_ADMIN_NAME-admin}
APP_ADMIN_EMAIL=${APP_ADMIN_EMAIL:-}

UNIT_FILE=/etc/systemd/system/$APP_NAME.service
NGINX_SITE=/etc/nginx/sites-available/$APP_NAME
NGINX_LINK=/etc/nginx/sites-enabled/$APP_NAME
NGINX_DEFAULT_LINK=/etc/nginx/sites-enabled/default
VENV=$APP_DIR/.venv
DB_PATH=$APP_DATA_DIR/management.sqlite3
MAX_BODY=1m  # = the app's MANAGEMENT_MAX_BODY_BYTES default (1 MiB)
WAIT_MAX=300   # the longest ?wait= the portal accepts (core/virsh.py WAIT_MAX)
POLL_GRACE=2   # seconds the last state poll of a wait may run past it (POLL_GRACE in core)
PROXY_MARGIN=30
# nginx limits per client address (see docs/operations.md "nginx limits")
NGINX_RATE=${NGINX_RATE:-10r/s}
NGINX_BURST=${NGINX_BURST:-50}
NGINX_CONNECTIONS=${NGINX_CONNECTIONS:-20}
SAFE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
POLICY_RC=/usr/sbin/policy-rc.d
LOCK_FILE=/run/$APP_NAME-install.lock

log() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

usage() {
    cat <<EOF
Usage: sudo $0 [--uninstall [--purge]] [--help]
       $0 --print-unit | --print-nginx-site     (what would be written, to stdout; no root needed)

Installs the PlayrServers QEMU Management Portal as the systemd service $APP_NAME, behind nginx.
Running it again upgrades in place: code and virtual environment are refreshed, the database is
migrated, and the data directory, the env file and the secret key are kept untouched.

Options:
  --uninstall   stop and remove the service, its unit, the nginx site and APP_DIR;
                keep the data directory, the env file and the user
  --purge       with --uninstall: also remove the data directory (database, secret key),
                the env file and the user
  --print-unit, --print-nginx-site
                print the systemd unit or nginx site this run would write, and exit
  -h, --help    show this help

Variables (current value):
  APP_REPO       git URL to clone instead of copying this checkout ($( [[ -n $APP_REPO ]] && printf '%s' "$APP_REPO" || printf 'unset'))
  APP_BRANCH     branch or tag of APP_REPO ($APP_BRANCH)
  APP_DIR        code and virtual environment, owned by root ($APP_DIR)
  APP_DOMAIN     nginx server_name ($APP_DOMAIN)
  APP_PORT       the service's port on 127.0.0.1 ($APP_PORT)
  INSTALL_NGINX  1 = install and configure nginx, 0 = skip it ($INSTALL_NGINX)
  APP_DATA_DIR   database and secret key, owned by the service user ($APP_DATA_DIR)
  APP_ENV_FILE   the service's MANAGEMENT_* settings, written once ($APP_ENV_FILE)
  APP_USER       the system user the service runs as ($APP_USER)
  NGINX_LISTEN   space-separated nginx listen addresses ($NGINX_LISTEN)
  PYTHON         the Python 3.11+ that builds the virtual environment ($PYTHON)
  APP_ADMIN_NAME the first user, created on the host when the database has none; its API key
                 is printed once (${APP_ADMIN_NAME:-empty: create no user})
  APP_ADMIN_EMAIL
                 that user's e-mail (${APP_ADMIN_EMAIL:-unset})
  NGINX_RATE, NGINX_BURST, NGINX_CONNECTIONS
                 nginx limits per client address: requests per second, burst above it, and
                 open connections ($NGINX_RATE, $NGINX_BURST, $NGINX_CONNECTIONS)
  MANAGEMENT_SIGNUP, MANAGEMENT_ALLOW_PLAIN_HTTP
                 written into a new env file when set (default: MANAGEMENT_SIGNUP=closed, and
                 credentials over plain HTTP refused); an existing env file is never changed
EOF
}

# ------------------------------------------------------------------------------------ checks
systemd_running() { [[ -d /run/systemd/system ]]; }

# check_path NAME VALUE: refuse empty, relative or system-critical paths (we rm -rf some of them)
check_path() {
    local name=$1 value=$2
    [[ $value == /* ]] || die "$name must be an absolute path, got '$value'"
    [[ $value != *[[:space:]]* ]] || die "$name must not contain whitespace, got '$value'"
    case ${value%/} in
        "" | /bin | /boot | /dev | /etc | /home | /lib | /lib64 | /opt | /proc | /root | /run | /sbin | \
        /srv | /sys | /tmp | /usr | /usr/* | /var | /var/lib | /var/log | /var/tmp | /etc/nginx*)
            die "$name=$value is a system directory; choose a directory of its own" ;;
    esac
}

check_settings() {
    [[ $(id -u) -eq 0 ]] || die "run as root: sudo $0"
    check_path APP_DIR "$APP_DIR"
    check_path APP_DATA_DIR "$APP_DATA_DIR"
    check_path APP_ENV_FILE "$APP_ENV_FILE"
    APP_DIR=${APP_DIR%/} APP_DATA_DIR=${APP_DATA_DIR%/}
    VENV=$APP_DIR/.venv DB_PATH=$APP_DATA_DIR/management.sqlite3
    case $APP_DATA_DIR/ in "$APP_DIR"/*) die "APP_DATA_DIR must not be inside APP_DIR (it is replaced on upgrade)" ;; esac
    case $APP_DIR/ in "$APP_DATA_DIR"/*) die "APP_DIR must not be inside APP_DATA_DIR" ;; esac
    if ! [[ $APP_PORT =~ ^[1-9][0-9]{0,4}$ ]] || ((APP_PORT > 65535)); then
        die "APP_PORT must be a port number (1-65535), got '$APP_PORT'"
    fi
    [[ $INSTALL_NGINX == 0 || $INSTALL_NGINX == 1 ]] || die "INSTALL_NGINX must be 0 or 1, got '$INSTALL_NGINX'"
    [[ $APP_DOMAIN =~ ^[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?$ ]] ||
        die "APP_DOMAIN must be a host name, got '$APP_DOMAIN'"
    [[ $APP_USER =~ ^[a-z_][a-z0-9_-]*$ ]] || die "APP_USER must be a valid user name, got '$APP_USER'"
    [[ $APP_BRANCH =~ ^[A-Za-z0-9._/-]+$ && $APP_BRANCH != -* ]] || die "APP_BRANCH looks wrong: '$APP_BRANCH'"
    check_common
}

# the settings --print-unit / --print-nginx-site use too (they need no root)
check_common() {
    [[ -z ${MANAGEMENT_SIGNUP:-} || $MANAGEMENT_SIGNUP =~ ^(open|first|closed)$ ]] ||
        die "MANAGEMENT_SIGNUP must be open, first or closed, got '$MANAGEMENT_SIGNUP'"
    [[ -z ${MANAGEMENT_ALLOW_PLAIN_HTTP:-} || $MANAGEMENT_ALLOW_PLAIN_HTTP =~ ^(true|false|1|0|yes|no|on|off)$ ]] ||
        die "MANAGEMENT_ALLOW_PLAIN_HTTP must be true or false, got '$MANAGEMENT_ALLOW_PLAIN_HTTP'"
    [[ -z $APP_ADMIN_NAME || $APP_ADMIN_NAME =~ ^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$ ]] ||
        die "APP_ADMIN_NAME looks wrong: '$APP_ADMIN_NAME'"
    [[ -z $APP_ADMIN_EMAIL || $APP_ADMIN_EMAIL =~ ^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+$ ]] ||
        die "APP_ADMIN_EMAIL looks wrong: '$APP_ADMIN_EMAIL'"
    [[ $NGINX_RATE =~ ^[1-9][0-9]{0,5}r/[sm]$ ]] || die "NGINX_RATE must look like 10r/s, got '$NGINX_RATE'"
    [[ $NGINX_BURST =~ ^[0-9]{1,6}$ ]] || die "NGINX_BURST must be a number, got '$NGINX_BURST'"
    [[ $NGINX_CONNECTIONS =~ ^[1-9][0-9]{0,5}$ ]] || die "NGINX_CONNECTIONS must be a number, got '$NGINX_CONNECTIONS'"
}

lock() {
    exec 9>"$LOCK_FILE"
    flock -n 9 || die "another install.sh is running (lock $LOCK_FILE)"
}

# The checkout this script lives in (empty when piped into bash, e.g. curl ... | sudo bash).
source_checkout() {
    local here
    [[ -n ${BASH_SOURCE[0]:-} && -f ${BASH_SOURCE[0]} ]] || return 0
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
    if [[ -f $here/setup.cfg && -f $here/main.py ]]; then
        printf '%s\n' "$here"
    fi
}

# ---------------------------------------------------------------------------------- packages
POLICY_CREATED=0
WORK_TMP=
SOURCE_CHECKOUT=

cleanup() {
    if [[ $POLICY_CREATED -eq 1 ]]; then
        rm -f "$POLICY_RC"
        POLICY_CREATED=0
    fi
    if [[ -n $WORK_TMP ]]; then
        rm -rf "$WORK_TMP"
        WORK_TMP=
    fi
}

installed() { [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]; }

ensure_packages() {
    local p missing=() wanted=(python3 python3-venv ca-certificates)
    [[ -n $APP_REPO ]] && wanted+=(git)
    [[ $INSTALL_NGINX == 1 ]] && wanted+=(nginx)
    for p in "${wanted[@]}"; do
        installed "$p" || missing+=("$p")
    done
    # python3-venv is a dependency package; the interpreter's own venv (ensurepip) must work too
    if [[ -x $PYTHON ]] && ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        missing+=("python$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv")
    fi
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "system packages already installed: ${wanted[*]}"
        return 0
    fi
    log "installing system packages: ${missing[*]}"
    # Without an init system (containers, CI) the packages' maintainer scripts would try to start
    # daemons through invoke-rc.d and fail; "exit 101" = action forbidden, so they skip it.
    if ! systemd_running && [[ ! -e $POLICY_RC ]]; then
        printf '#!/bin/sh\n# temporary, from %s: no init system, do not start daemons\nexit 101\n' "$0" >"$POLICY_RC"
        chmod 0755 "$POLICY_RC"
        POLICY_CREATED=1
    fi
    local -a apt=(apt-get install -y -q --no-install-recommends
                  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q
    fi
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" "${missing[@]}"; then
        log "apt-get install failed; updating the package lists and retrying"
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" "${missing[@]}"
    fi
    cleanup  # remove our policy-rc.d as soon as apt is done
}

check_python() {
    [[ -x $PYTHON ]] || die "$PYTHON not found (set PYTHON to a Python 3.11+ interpreter)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is $("$PYTHON" -V 2>&1); the portal needs Python 3.11 or newer"
}

# ------------------------------------------------------------------------------ user and data
ensure_user() {
    if id -u "$APP_USER" >/dev/null 2>&1; then
        log "system user $APP_USER exists"
    else
        log "creating system user $APP_USER (no login shell, home $APP_DATA_DIR)"
        useradd --system --user-group --no-create-home --home-dir "$APP_DATA_DIR" \
                --shell /usr/sbin/nologin --comment "PlayrServers management portal" "$APP_USER"
    fi
    APP_GROUP=$(id -gn "$APP_USER")
}

ensure_data_dir() {
    if [[ -d $APP_DATA_DIR ]]; then
        log "keeping data directory $APP_DATA_DIR"
    else
        log "creating data directory $APP_DATA_DIR"
    fi
    install -d -m 0750 -o "$APP_USER" -g "$APP_GROUP" "$APP_DATA_DIR"
    chown "$APP_USER:$APP_GROUP" "$APP_DATA_DIR"
    chmod 0750 "$APP_DATA_DIR"
}

write_env_file() {
    if [[ -e $APP_ENV_FILE ]]; then
        log "keeping $APP_ENV_FILE (never overwritten; edit it and restart the service)"
        load_env
        local port
        port=$(env_value MANAGEMENT_PORT)
        if [[ -n $port && $port != "$APP_PORT" ]]; then
            [[ -n $APP_PORT_SET ]] &&
                warn "APP_PORT=$APP_PORT differs from MANAGEMENT_PORT=$port in $APP_ENV_FILE; using $port"
            APP_PORT=$port
        fi
        local signup
        signup=$(env_value MANAGEMENT_SIGNUP)
        if [[ ${signup:-first} != closed ]]; then
            warn "MANAGEMENT_SIGNUP=${signup:-first} in $APP_ENV_FILE lets users sign up over the network; new installs write closed (create users with: $APP_NAME users create)"
        fi
        return 0
    fi
    log "writing $APP_ENV_FILE (0640 root:$APP_GROUP)"
    local tmp
    tmp=$(mktemp "$APP_ENV_FILE.XXXXXX")
    cat >"$tmp" <<EOF
# $APP_ENV_FILE - settings of the $APP_NAME service (read by systemd's EnvironmentFile=).
# Written once by scripts/install.sh and never overwritten: edit it, then restart the service.
# Plain NAME=value lines, no quotes needed; see README.md "Configuration" and docs/operations.md.

MANAGEMENT_HOST=127.0.0.1
MANAGEMENT_PORT=$APP_PORT
MANAGEMENT_WORKERS=2
MANAGEMENT_DB_PATH=$DB_PATH
MANAGEMENT_LOG_FORMAT=json
# closed: users come from the host (manage-playrservers users create); install.sh made the first
MANAGEMENT_SIGNUP=${MANAGEMENT_SIGNUP:-closed}
$(if [[ -n ${MANAGEMENT_ALLOW_PLAIN_HTTP:-} ]]; then
    printf 'MANAGEMENT_ALLOW_PLAIN_HTTP=%s\n' "$MANAGEMENT_ALLOW_PLAIN_HTTP"
else
    printf '# API keys through nginx over plain HTTP are refused (403 https_required) until TLS is set\n'
    printf '# up (certbot); true accepts them (only on a network you trust):\n#MANAGEMENT_ALLOW_PLAIN_HTTP=false\n'
fi)

# Other variables, with their defaults: uncomment a line (no trailing comments: systemd would
# take them as part of the value) and restart the service.
# The key that seals SSH keys at rest; created 0600 on first start; back it up separately:
#MANAGEMENT_SECRET_KEY_FILE=$APP_DATA_DIR/secret.key
# ...or the key itself (manage-playrservers secret-key prints one) instead of the file:
#MANAGEMENT_SECRET_KEY=
# A SQLAlchemy URL instead of MANAGEMENT_DB_PATH:
#MANAGEMENT_DATABASE_URL=
# debug, info, warning or error:
#MANAGEMENT_LOG_LEVEL=info
# Request body limit in bytes (nginx's client_max_body_size is $MAX_BODY):
#MANAGEMENT_MAX_BODY_BYTES=1048576
# Failed authentications allowed per client address per window (seconds):
#MANAGEMENT_AUTH_FAILURE_LIMIT=20
#MANAGEMENT_AUTH_FAILURE_WINDOW=60
# Seconds a request waits for the database's write lock or a free pooled connection:
#MANAGEMENT_DB_BUSY_TIMEOUT=10
# PostgreSQL only: connections per worker process, and seconds start-up waits for the server:
#MANAGEMENT_DB_POOL_SIZE=5
#MANAGEMENT_DB_CONNECT_WAIT=30
# Seconds to connect (and log in) to a hypervisor, and for one virsh command (nginx waits for
# their sum + 300 s of ?wait= + a margin: re-run install.sh after changing them):
#MANAGEMENT_SSH_CONNECT_TIMEOUT=10
#MANAGEMENT_SSH_COMMAND_TIMEOUT=60
# Seconds an unused pooled SSH connection stays open:
#MANAGEMENT_SSH_IDLE_TIMEOUT=300
# Networks agents may point at, comma-separated; unset: every address but loopback, link-local
# (cloud metadata), multicast, unspecified and reserved. A list replaces that default, e.g.:
#MANAGEMENT_AGENT_NETWORKS=10.0.0.0/8,192.168.0.0/16
# Output one remote command may write (bytes), and SSH commands one user may run at once per worker:
#MANAGEMENT_MAX_OUTPUT_BYTES=4194304
#MANAGEMENT_MAX_OPERATIONS_PER_USER=16
EOF
    chown "root:$APP_GROUP" "$tmp"
    chmod 0640 "$tmp"
    mv -f "$tmp" "$APP_ENV_FILE"
    load_env
}

# load_env: ENV_VARS=(NAME=value ...) from the env file, read the way systemd's EnvironmentFile=
# reads simple files (comments, blank lines, optional quotes); no shell evaluation
ENV_VARS=()
load_env() {
    local line name value
    ENV_VARS=()
    [[ -f $APP_ENV_FILE ]] || return 0
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line#"${line%%[![:space:]]*}"}
        [[ -z $line || $line == '#'* || $line == ';'* ]] && continue
        [[ $line =~ ^([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*=[[:space:]]*(.*)$ ]] || continue
        name=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
        value=${value%"${value##*[![:space:]]}"}
        if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then
            value=${BASH_REMATCH[1]}
        fi
        ENV_VARS+=("$name=$value")
    done <"$APP_ENV_FILE"
}

# env_value NAME: the env file's value of NAME (the last one wins, as in systemd); empty if unset
env_value() {
    local pair value=""
    for pair in "${ENV_VARS[@]}"; do
        [[ $pair == "$1="* ]] && value=${pair#*=}
    done
    printf '%s' "$value"
}

# as_service CMD...: run CMD as the service user, in the data directory, with exactly the env
# file's variables (what the unit does, minus the sandbox)
as_service() {
    (
        cd "$APP_DATA_DIR"
        umask 0077
        runuser -u "$APP_USER" -- env -i PATH="$SAFE_PATH" HOME="$APP_DATA_DIR" USER="$APP_USER" \
            LOGNAME="$APP_USER" LANG=C.UTF-8 "${ENV_VARS[@]}" "$@"
    )
}

# ---------------------------------------------------------------------------- code and venv
# ours DIR: DIR holds an installation of the portal (so replacing or removing it is fine)
ours() { [[ -f $1/main.py && -f $1/setup.cfg ]] || [[ -x $1/.venv/bin/$APP_NAME ]]; }

fetch_code() {
    local src
    if [[ -n $APP_REPO ]]; then
        WORK_TMP=$(mktemp -d)
        log "cloning $APP_REPO (branch $APP_BRANCH)"
        git clone --quiet --depth 1 --branch "$APP_BRANCH" -- "$APP_REPO" "$WORK_TMP/src"
        note "at commit $(git -C "$WORK_TMP/src" rev-parse --short HEAD)"
        src=$WORK_TMP/src
    else
        src=$SOURCE_CHECKOUT
    fi
    [[ -f $src/setup.cfg && -f $src/main.py ]] || die "$src is not the portal (no setup.cfg/main.py)"

    install -d -m 0755 -o root -g root "$APP_DIR"
    if [[ $(cd "$src" && pwd -P) == $(cd "$APP_DIR" && pwd -P) ]]; then
        log "running from $APP_DIR itself: keeping its code as it is"
    else
        log "copying the code from $src to $APP_DIR"
        # replace everything but the virtual environment (refreshed below)
        find "$APP_DIR" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf -- {} +
        tar -C "$src" -cf - \
            --anchored --exclude=./.venv --exclude=./.git --exclude=./data --exclude=./.lab \
            --exclude=./.tox --exclude=./build --exclude=./dist --exclude=./.pytest_cache \
            --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.hypothesis --exclude=./.screenshots \
            --no-anchored --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' . |
            tar -C "$APP_DIR" -xf - --no-same-owner --no-same-permissions
    fi
    if [[ -n $WORK_TMP ]]; then
        rm -rf "$WORK_TMP"
        WORK_TMP=
    fi
}

build_venv() {
    local want have
    want=$("$PYTHON" -c 'import sys; print(sys.version.split()[0])')
    have=$("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || true)
    if [[ $have != "$want" ]]; then
        [[ -n $have ]] && log "the virtual environment has Python $have, not $want: rebuilding it"
        log "creating the virtual environment $VENV (Python $want)"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
    else
        log "refreshing the virtual environment $VENV (Python $have)"
    fi
    # web console (issue 19): xterm.js and noVNC from the npm registry, pinned and verified by sha512
    log "putting the web console's browser libraries in place (scripts/web_assets.py)"
    "$PYTHON" "$APP_DIR/scripts/web_assets.py" || die "could not fetch the web console's browser libraries"
    log "installing the package into $VENV (pip install $APP_DIR)"
    local pip_log=$APP_DIR/.pip-install.log
    # a local directory is always rebuilt and reinstalled, even when its version did not change
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --upgrade "$APP_DIR" \
            >"$pip_log" 2>&1; then
        tail -n 40 "$pip_log" >&2
        die "pip install failed; full log in $pip_log"
    fi
    rm -rf "$APP_DIR/build" "$APP_DIR"/*.egg-info
    note "$("$VENV/bin/python" -m pip show manage-playrservers | sed -n 's/^Version: /manage-playrservers /p') installed"
    # compile main.py's imports ahead of time: the service cannot write to APP_DIR
    "$VENV/bin/python" -m compileall -q -x '/\.venv/' "$APP_DIR" >/dev/null || true
    chown -R root:root "$APP_DIR"
    chmod -R go-w "$APP_DIR"
    "$VENV/bin/$APP_NAME" --help >/dev/null || die "$VENV/bin/$APP_NAME does not run"
}

migrate() {
    log "migrating the database as $APP_USER ($APP_NAME db upgrade)"
    local out
    out=$(as_service "$VENV/bin/$APP_NAME" db upgrade) ||
        die "the migration failed (see above); if it names a variable, fix it in $APP_ENV_FILE and re-run"
    note "$out"
    # `db upgrade` also loads (or, on a first install, creates) the secret key exactly as the
    # server does: the key file is made 0600 and owned by the service user now, and a broken
    # setting or key fails here, naming the variable, rather than at the service's start.
    local key_file
    key_file=$(env_value MANAGEMENT_SECRET_KEY_FILE)
    key_file=${key_file:-$(dirname "$(env_value MANAGEMENT_DB_PATH)")/secret.key}
    if [[ -n $(env_value MANAGEMENT_SECRET_KEY) ]]; then
        note "secret key: MANAGEMENT_SECRET_KEY in $APP_ENV_FILE"
    elif [[ -f $key_file ]]; then
        note "secret key: $key_file (back it up separately from the database)"
    fi
}

# first_user: on a database without users, create APP_ADMIN_NAME on the host and print its API key
# once. Sign-up stays closed (MANAGEMENT_SIGNUP=closed), so nobody can be first over the network.
FIRST_USER_KEY=
FIRST_USER_ID=
first_user() {
    local users created
    if [[ -z $APP_ADMIN_NAME ]]; then
        log "APP_ADMIN_NAME is empty: no first user created"
        return 0
    fi
    users=$(as_service "$VENV/bin/$APP_NAME" users list --json) || die "cannot list the users (see above)"
    if [[ $("$VENV/bin/python" -c 'import json, sys; print(len(json.load(sys.stdin)))' <<<"$users") != 0 ]]; then
        log "the database has users already: no first user created"
        return 0
    fi
    log "creating the first user '$APP_ADMIN_NAME' on the host (sign-up over the network stays closed)"
    local -a args=(users create --name "$APP_ADMIN_NAME")
    [[ -n $APP_ADMIN_EMAIL ]] && args+=(--email "$APP_ADMIN_EMAIL")
    created=$(as_service "$VENV/bin/$APP_NAME" "${args[@]}" 2>/dev/null) || die "creating the first user failed"
    FIRST_USER_KEY=$("$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["api_key"])' <<<"$created")
    FIRST_USER_ID=$("$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["id"])' <<<"$created")
}

print_first_user_key() {
    [[ -n $FIRST_USER_KEY ]] || return 0
    log "the first user's API key (user id $FIRST_USER_ID, '$APP_ADMIN_NAME'), shown only this once:"
    printf '\n    API_KEY=%s\n\n' "$FIRST_USER_KEY"
    note "store it now; lost: $VENV/bin/$APP_NAME users rotate-key --id $FIRST_USER_ID (as $APP_USER, see docs/operations.md)"
    if [[ $INSTALL_NGINX == 1 && ! $(env_value MANAGEMENT_ALLOW_PLAIN_HTTP) =~ ^(true|1|yes|on)$ ]]; then
        note "through nginx it is accepted over HTTPS only (403 https_required over plain HTTP): set up TLS"
    fi
}

# ------------------------------------------------------------------------------------ systemd
exec_start() { printf '%s %s' "$VENV/bin/python" "$APP_DIR/main.py"; }

# Outgoing SSH must reach hypervisors on any address, so the IP filter cannot be "deny all but
# loopback": it allows every unicast address and denies only link-local (169.254.0.0/16, where cloud
# metadata services answer, and fe80::/10) and multicast/reserved ranges, which no hypervisor uses.
# (IPAddressDeny=any with these allow lists = everything else; computed with Python's ipaddress.)
IP_ALLOW_V4="0.0.0.0/1 128.0.0.0/3 160.0.0.0/5 168.0.0.0/8 169.0.0.0/9 169.128.0.0/10 169.192.0.0/11 169.224.0.0/12 169.240.0.0/13 169.248.0.0/14 169.252.0.0/15 169.255.0.0/16 170.0.0.0/7 172.0.0.0/6 176.0.0.0/4 192.0.0.0/3"
IP_ALLOW_V6="::/1 8000::/2 c000::/3 e000::/4 f000::/5 f800::/6 fc00::/7 fe00::/9 fec0::/10"

# --- scale (issue 22)
# open_files_limit: the unit's LimitNOFILE. Each worker keeps an SSH connection (a descriptor) per
# agent it talks to, and the fleet view opens up to MANAGEMENT_FLEET_PARALLELISM at once; the
# portal asks at most (limit - 256) / 2 agents at once (entrypoints/bootstrap.py
# fleet_parallelism), so the limit is at least 256 + 2 x the setting, and never below 65536
# (the systemd default soft limit of 1024 would cap a fleet view at 384 agents and the pool at
# about 1000 connections per worker).
open_files_limit() {
    local parallelism
    [[ -r $APP_ENV_FILE ]] && load_env
    parallelism=$(env_value MANAGEMENT_FLEET_PARALLELISM)
    [[ $parallelism =~ ^[0-9]+$ ]] || parallelism=256
    local need=$((256 + 2 * parallelism))
    printf '%s' $((need > 65536 ? need : 65536))
}

unit_text() {
    cat <<EOF
# $UNIT_FILE - written by scripts/install.sh (re-running it rewrites this file;
# put local changes in a drop-in: systemctl edit $APP_NAME)
[Unit]
Description=PlayrServers QEMU Management Portal
Documentation=file://$APP_DIR/docs/operations.md
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=$APP_USER
Group=$APP_GROUP
EnvironmentFile=$APP_ENV_FILE
WorkingDirectory=$APP_DATA_DIR
ExecStart=$(exec_start)
Restart=on-failure
RestartSec=5
# exit status 2 = a configuration error (the message names the variable): fix it, do not loop
RestartPreventExitStatus=2
TimeoutStopSec=45
UMask=0077
# descriptors: one per pooled SSH connection (one per agent and worker), see open_files_limit
LimitNOFILE=$(open_files_limit)

# Hardening (systemd-analyze security $APP_NAME; docs/operations.md "The systemd unit")
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=$APP_DATA_DIR
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
ProtectHome=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RemoveIPC=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
# what a service needs, minus privileged calls and resource changes; a refused call fails with
# EPERM instead of killing the worker
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
CapabilityBoundingSet=
AmbientCapabilities=
IPAddressDeny=any
IPAddressAllow=$IP_ALLOW_V4
IPAddressAllow=$IP_ALLOW_V6
# two workers use ~150 MiB; past MemoryMax the kernel kills the service and systemd restarts it
MemoryHigh=768M
MemoryMax=1G
TasksMax=512

[Install]
WantedBy=multi-user.target
EOF
}

write_unit() {
    log "writing the systemd unit $UNIT_FILE"
    install -d -m 0755 "$(dirname "$UNIT_FILE")"
    local tmp
    tmp=$(mktemp "$UNIT_FILE.XXXXXX")
    unit_text >"$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$UNIT_FILE"
}

# healthy: the service answers GET /health on its own port
healthy() {
    "$VENV/bin/python" - "$APP_PORT" <<'PY' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2) as answer:
    sys.exit(0 if answer.status == 200 else 1)
PY
}

service_pids() { pgrep -u "$APP_USER" -f "$APP_DIR/main.py" 2>/dev/null || true; }

manual_start_command() {
    printf 'cd %s && runuser -u %s -- env -i PATH=%s HOME=%s LANG=C.UTF-8 %s' "$APP_DATA_DIR" "$APP_USER" \
        "$SAFE_PATH" "$APP_DATA_DIR" "sh -c 'umask 0077; set -a; . $APP_ENV_FILE; set +a; exec $(exec_start)'"
}

start_service() {
    if systemd_running; then
        log "starting the service (systemctl)"
        systemctl daemon-reload
        systemctl enable --quiet "$APP_NAME.service"
        systemctl restart "$APP_NAME.service"
        # "active" alone proves little: a service that dies at once is active for a moment, then
        # restarted. Wait for its /health on 127.0.0.1, and stop waiting when systemd restarts it.
        local i
        for ((i = 0; i < 120; i++)); do
            if [[ $(systemctl show -p NRestarts --value "$APP_NAME.service") != 0 ]] ||
               systemctl is-failed --quiet "$APP_NAME.service"; then
                break
            fi
            healthy && break
            sleep 0.5
        done
        if ! healthy || [[ $(systemctl show -p NRestarts --value "$APP_NAME.service") != 0 ]]; then
            systemctl status --no-pager --lines=30 "$APP_NAME.service" >&2 || true
            die "$APP_NAME did not start (see above and: journalctl -u $APP_NAME -n 50)"
        fi
        note "$APP_NAME is active and answers /health on 127.0.0.1:$APP_PORT; logs: journalctl -u $APP_NAME -f"
        return 0
    fi
    local pids
    pids=$(service_pids)
    log "systemd is not running here (no /run/systemd/system): the unit is written but not started"
    if [[ -n $pids ]]; then
        note "the service is running from an older install (pids: $(echo "$pids" | tr '\n' ' '))"
        note "restart it to use the new code: kill -TERM $(echo "$pids" | head -n 1), then start it again:"
    else
        note "start it by hand exactly as the unit would (as $APP_USER, with $APP_ENV_FILE):"
    fi
    printf '\n    %s\n\n' "$(manual_start_command)"
    note "(append '>>$APP_DATA_DIR/server.log 2>&1 &' to keep it running in the background)"
}

stop_service() {
    if systemd_running; then
        if [[ -f $UNIT_FILE ]] || systemctl cat "$APP_NAME.service" >/dev/null 2>&1; then
            log "stopping and disabling $APP_NAME (systemctl)"
            systemctl disable --now --quiet "$APP_NAME.service" 2>/dev/null || true
        fi
        return 0
    fi
    local pids
    pids=$(service_pids)
    if [[ -n $pids ]]; then
        die "the service is still running (pids: $(echo "$pids" | tr '\n' ' ')) and there is no systemd to stop it; stop it (kill -TERM $(echo "$pids" | head -n 1)) and re-run"
    fi
}

# -------------------------------------------------------------------------------------- nginx
nginx_running() {
    local pid
    [[ -s /run/nginx.pid ]] || return 1
    pid=$(tr -dc '0-9' </run/nginx.pid)
    [[ -n $pid && -d /proc/$pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == nginx ]]
}

nginx_apply() {
    nginx -t -q || die "nginx -t failed: the configuration above is wrong"
    if systemd_running; then
        systemctl enable --quiet nginx
        if systemctl is-active --quiet nginx; then
            systemctl reload nginx
        else
            systemctl start nginx
        fi
    elif nginx_running; then
        nginx -s reload
    else
        nginx 9>&-  # the daemon must not inherit (and so hold forever) our lock
    fi
}

# seconds_of NAME DEFAULT: the env file's value of NAME (a number of seconds), rounded up
seconds_of() {
    local value
    value=$(env_value "$1")
    value=${value:-$2}
    [[ $value =~ ^[0-9]+([.][0-9]+)?$ ]] || value=$2
    awk -v v="$value" 'BEGIN { r = int(v); if (r < v) r++; print r }'
}

# How long nginx waits for the portal's answer: the longest request is a VM action with
# ?wait=300: connecting (MANAGEMENT_SSH_CONNECT_TIMEOUT) + the command
# (MANAGEMENT_SSH_COMMAND_TIMEOUT) + the wait + its last poll's grace, plus a margin.
proxy_timeout() {
    echo $(($(seconds_of MANAGEMENT_SSH_CONNECT_TIMEOUT 10) + $(seconds_of MANAGEMENT_SSH_COMMAND_TIMEOUT 60) +
            WAIT_MAX + POLL_GRACE + PROXY_MARGIN))
}

# --- consoles (issue 17): a console's WebSocket lives as long as the portal lets it
# (MANAGEMENT_CONSOLE_MAX_SECONDS, 8 h by default; idle ones end after MANAGEMENT_CONSOLE_IDLE_TIMEOUT):
# nginx must never cut one first, whichever side stays silent.
console_timeout() {
    echo $(($(seconds_of MANAGEMENT_CONSOLE_MAX_SECONDS 28800) + PROXY_MARGIN))
}

nginx_site_text() {
    local addr listen="" timeout
    for addr in $NGINX_LISTEN; do
        listen+="    listen $addr;"$'\n'
    done
    timeout=$(proxy_timeout)
    cat <<EOF
# TLS: certbot --nginx -d $APP_DOMAIN   (adds the 443 server and the redirect to this file)

# Per client address: at most $NGINX_RATE with bursts of $NGINX_BURST more (answered at once, then 429),
# and $NGINX_CONNECTIONS open connections (a ?wait= holds one for minutes). See docs/operations.md.
limit_req_zone \$binary_remote_addr zone=manage_playrservers_req:10m rate=$NGINX_RATE;
limit_conn_zone \$binary_remote_addr zone=manage_playrservers_conn:10m;

server {
$listen    server_name $APP_DOMAIN;
    server_tokens off;

    limit_req zone=manage_playrservers_req burst=$NGINX_BURST nodelay;
    limit_conn manage_playrservers_conn $NGINX_CONNECTIONS;
    limit_req_status 429;
    limit_conn_status 429;

    # = the portal's MANAGEMENT_MAX_BODY_BYTES (1 MiB): larger bodies get 413 here
    client_max_body_size $MAX_BODY;
    # slow or oversized headers are cut off here, before they reach the portal
    client_header_timeout 10s;
    client_body_timeout 30s;
    large_client_header_buffers 4 16k;

    location / {
        proxy_pass http://127.0.0.1:$APP_PORT;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host \$host;
        proxy_set_header X-Real-IP \$remote_addr;
        proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto \$scheme;
        proxy_set_header X-Forwarded-Host \$host;
        # the longest answer: a VM action with ?wait=$WAIT_MAX = MANAGEMENT_SSH_CONNECT_TIMEOUT +
        # MANAGEMENT_SSH_COMMAND_TIMEOUT + $WAIT_MAX s + ${POLL_GRACE} s of grace + ${PROXY_MARGIN} s
        proxy_connect_timeout 10s;
        proxy_send_timeout 90s;
        proxy_read_timeout ${timeout}s;
    }

    # consoles (issue 17): GET /console/{ticket} upgrades to a WebSocket (serial bytes, or RFB for
    # noVNC); the one-time ticket in the path is its credential
    location /console/ {
        proxy_pass http://127.0.0.1:$APP_PORT;
        proxy_http_version 1.1;
        proxy_set_header Upgrade \$http_upgrade;
        proxy_set_header Connection "upgrade";
        proxy_set_header Host \$host;
        proxy_set_header X-Real-IP \$remote_addr;
        proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto \$scheme;
        proxy_set_header X-Forwarded-Host \$host;
        proxy_buffering off;
        # a session may last MANAGEMENT_CONSOLE_MAX_SECONDS (+${PROXY_MARGIN} s); the portal ends idle ones itself
        proxy_connect_timeout 10s;
        proxy_send_timeout $(console_timeout)s;
        proxy_read_timeout $(console_timeout)s;
    }
}
EOF
}

write_nginx_site() {
    local tmp disabled_default=0
    if [[ -f $NGINX_SITE ]] && grep -q 'managed by Certbot' "$NGINX_SITE"; then
        # certbot added TLS to the site: rewriting it would drop HTTPS; keep it as it is
        log "keeping the nginx site $NGINX_SITE: certbot manages TLS in it"
        grep -q "proxy_pass http://127.0.0.1:$APP_PORT;" "$NGINX_SITE" ||
            warn "$NGINX_SITE does not proxy to 127.0.0.1:$APP_PORT (MANAGEMENT_PORT); fix its proxy_pass"
        ln -sfn "$NGINX_SITE" "$NGINX_LINK"
        nginx_apply
        return 0
    fi
    log "writing the nginx site $NGINX_SITE ($APP_DOMAIN -> 127.0.0.1:$APP_PORT, waits up to $(proxy_timeout) s)"
    if [[ -L $NGINX_DEFAULT_LINK ]]; then
        log "disabling nginx's default site (rm $NGINX_DEFAULT_LINK)"
        rm -f "$NGINX_DEFAULT_LINK"
        disabled_default=1
    elif [[ -f $NGINX_SITE ]] && grep -q '^# installer disabled the default site' "$NGINX_SITE"; then
        disabled_default=1
    fi
    tmp=$(mktemp "$NGINX_SITE.XXXXXX")
    {
        printf '# %s - written by scripts/install.sh (re-running it rewrites this file)\n' "$NGINX_SITE"
        [[ $disabled_default -eq 1 ]] &&
            printf '# installer disabled the default site: ln -s ../sites-available/default %s\n' \
                "$NGINX_DEFAULT_LINK"
        nginx_site_text
    } >"$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$NGINX_SITE"
    ln -sfn "$NGINX_SITE" "$NGINX_LINK"
    nginx_apply
    note "nginx serves http://$APP_DOMAIN/ (point the domain's DNS at this host)"
    note "TLS: apt-get install certbot python3-certbot-nginx && certbot --nginx -d $APP_DOMAIN"
}

remove_nginx_site() {
    local had=0 reenable=""
    if [[ -f $NGINX_SITE ]] && grep -q '^# installer disabled the default site' "$NGINX_SITE"; then
        reenable=1
    fi
    if [[ -e $NGINX_LINK || -L $NGINX_LINK ]]; then rm -f "$NGINX_LINK"; had=1; fi
    if [[ -e $NGINX_SITE ]]; then rm -f "$NGINX_SITE"; had=1; fi
    [[ $had -eq 1 ]] || return 0
    log "removed the nginx site $NGINX_SITE"
    if command -v nginx >/dev/null; then
        if systemd_running && systemctl is-active --quiet nginx; then
            nginx -t -q && systemctl reload nginx
        elif nginx_running; then
            nginx -t -q && nginx -s reload
        fi
    fi
    if [[ -n $reenable ]]; then
        note "nginx's default site stays disabled; to re-enable it:"
        note "  ln -s ../sites-available/default $NGINX_DEFAULT_LINK && nginx -s reload"
    fi
}

# ----------------------------------------------------------------------------------- commands
do_install() {
    local t0=$SECONDS
    log "installing the PlayrServers management portal into $APP_DIR"
    ensure_packages
    check_python
    ensure_user
    ensure_data_dir
    write_env_file
    fetch_code
    build_venv
    migrate
    write_unit
    if [[ $INSTALL_NGINX == 1 ]]; then
        write_nginx_site
    else
        log "INSTALL_NGINX=0: no nginx site (the service listens on 127.0.0.1:$APP_PORT)"
    fi
    start_service
    # last, so that a failure above never leaves a user whose key was not shown (a re-run makes it)
    first_user
    log "done in $((SECONDS - t0)) s"
    note "code: $APP_DIR   data: $APP_DATA_DIR   settings: $APP_ENV_FILE   unit: $UNIT_FILE"
    print_first_user_key
    note "operations (backup, restore, logs, TLS): $APP_DIR/docs/operations.md"
}

do_uninstall() {
    local purge=$1
    log "uninstalling the PlayrServers management portal$([[ $purge -eq 1 ]] && printf ' (purge)')"
    stop_service
    if [[ -e $UNIT_FILE ]]; then
        rm -f "$UNIT_FILE"
        log "removed $UNIT_FILE"
        systemd_running && systemctl daemon-reload
    fi
    remove_nginx_site
    if [[ -e $APP_DIR ]]; then
        if ours "$APP_DIR" || [[ -z $(ls -A "$APP_DIR") ]]; then
            rm -rf -- "$APP_DIR"
            log "removed $APP_DIR"
        else
            warn "$APP_DIR does not hold the portal; left it alone"
        fi
    fi
    if [[ $purge -eq 1 ]]; then
        if [[ -d $APP_DATA_DIR && $(stat -c %U "$APP_DATA_DIR") != "$APP_USER" ]]; then
            warn "$APP_DATA_DIR does not belong to $APP_USER; left it alone"
        elif [[ -e $APP_DATA_DIR ]]; then
            rm -rf -- "$APP_DATA_DIR"
            log "removed $APP_DATA_DIR (database, secret key)"
        fi
        if [[ -e $APP_ENV_FILE ]]; then rm -f -- "$APP_ENV_FILE"; log "removed $APP_ENV_FILE"; fi
        if id -u "$APP_USER" >/dev/null 2>&1; then
            userdel "$APP_USER"
            log "removed user $APP_USER"
        fi
        if getent group "$APP_USER" >/dev/null; then groupdel "$APP_USER" || true; fi
    else
        log "kept (remove them with --uninstall --purge):"
        [[ -e $APP_DATA_DIR ]] && note "$APP_DATA_DIR (database and secret key)"
        [[ -e $APP_ENV_FILE ]] && note "$APP_ENV_FILE"
        id -u "$APP_USER" >/dev/null 2>&1 && note "the system user $APP_USER"
    fi
    log "done; packages (python3, nginx, ...) were left installed"
}

main() {
    local uninstall=0 purge=0 arg print=""
    for arg in "$@"; do
        case $arg in
            --uninstall) uninstall=1 ;;
            --purge) purge=1 ;;
            -h | --help) usage; exit 0 ;;
            --print-unit | --print-nginx-site) print=$arg ;;
            *) usage >&2; die "unknown argument: $arg" ;;
        esac
    done
    [[ $purge -eq 0 || $uninstall -eq 1 ]] || die "--purge only goes with --uninstall"
    if [[ -n $print ]]; then
        check_common
        APP_GROUP=$APP_USER
        [[ -r $APP_ENV_FILE ]] && load_env
        if [[ $print == --print-unit ]]; then unit_text; else nginx_site_text; fi
        exit 0
    fi
    check_settings
    lock
    trap cleanup EXIT
    if [[ $uninstall -eq 1 ]]; then
        do_uninstall "$purge"
    else
        SOURCE_CHECKOUT=$(source_checkout)
        [[ -n $APP_REPO || -n $SOURCE_CHECKOUT ]] ||
            die "cannot find the portal's checkout next to this script (piped into bash?); set APP_REPO to its git URL"
        if [[ -d $APP_DIR && -n $(ls -A "$APP_DIR") ]] && ! ours "$APP_DIR"; then
            die "$APP_DIR exists and does not hold the portal; refusing to replace what is in it (set APP_DIR)"
        fi
        do_install
    fi
}

main "$@"
