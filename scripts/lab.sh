#!/usr/bin/env bash
# scripts/lab.sh - local test lab for playr: libvirtd (qemu:///system, TCG
# guests) reachable through a private OpenSSH server on 127.0.0.1.
#
#   bash scripts/lab.sh up      # idempotent; prints KEY=value lines (stdout)
#   bash scripts/lab.sh down    # remove lab guests, stop what `up` started
#   bash scripts/lab.sh status  # what is running
#   bash scripts/lab.sh stop-daemon libvirtd|virtlogd|sshd   # a fault, for tests; `up` restores it
#   bash scripts/lab.sh restore # start again, exactly as it ran, what stop-daemon stopped
#
# Progress goes to stderr; stdout of `up` is only the env lines, so
#   eval "$(bash scripts/lab.sh up)"   works.  See docs/lab.md.
set -euo pipefail

STATE_DIR=${LAB_STATE_DIR:-/var/tmp/playr-lab}
CACHE_DIR=${LAB_CACHE:-/var/cache/playr-lab}
LAB_USER=${LAB_USER:-playrlab}
LAB_GROUP=libvirt
URI=qemu:///system
BOOT_GUESTS=(lab-guest1 lab-guest2)
DISK_GUEST=lab-disk
ALL_GUESTS=("${BOOT_GUESTS[@]}" "$DISK_GUEST")
# --- consoles (issue 17): a guest with a shell on its serial port (a pty) and VNC on loopback
CONSOLE_GUEST=console-guest
GUEST_MEM_MIB=${LAB_GUEST_MEM_MIB:-128}
GUEST_CMDLINE="console=ttyS0 quiet loglevel=3"
PACKAGES=(openssh-server libvirt-daemon-system libvirt-clients qemu-system-x86
          busybox-static qemu-utils cpio
          mtools syslinux syslinux-common dosfstools dnsmasq-base)  # provisioning (issue 16)

SSHD_CONF=$STATE_DIR/sshd_config
SSHD_PID=$STATE_DIR/sshd.pid
SSHD_LOG=$STATE_DIR/sshd.log
HOST_KEY=$STATE_DIR/ssh_host_ed25519_key
CLIENT_KEY=$STATE_DIR/id_ed25519
KNOWN_HOSTS=$STATE_DIR/known_hosts
PORT_FILE=$STATE_DIR/ssh_port
LIBVIRTD_CONF=$STATE_DIR/libvirtd.conf
LIBVIRTD_PID=$STATE_DIR/libvirtd.pid
VIRTLOGD_PID=$STATE_DIR/virtlogd.pid
ENV_FILE=$STATE_DIR/lab.env
KERNEL=$CACHE_DIR/vmlinuz
INITRD=$CACHE_DIR/initrd.img
CONSOLE_INITRD=$CACHE_DIR/console-initrd.img

log() { printf '[lab] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root"; }

lock_state() {
    mkdir -p "$STATE_DIR"
    chmod 0755 "$STATE_DIR"
    exec 9>"$STATE_DIR/.lock"
    flock -w 300 9 || die "another lab.sh holds $STATE_DIR/.lock"
}

vsh() { virsh -q -c "$URI" "$@"; }

# pid_alive PIDFILE NAME [ARG] -> prints pid if the file names a live process NAME (whose argv
# holds ARG, when given: a stale pid file whose pid now belongs to another sshd or libvirtd, e.g. the
# distribution's, must never make the lab think it owns, or stop, that process)
pid_alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm") == "$2" ]] || return 1
    not_zombie "$pid" || return 1
    if [[ -n ${3:-} ]]; then
        argv_has "$pid" "$3" || return 1
    fi
    printf '%s\n' "$pid"
}

# argv_has PID WORD: WORD is one of the process's arguments (as a whole word: sshd rewrites its
# argv into one title, "sshd: /usr/sbin/sshd -f CONF ... [listener] ...")
argv_has() {
    local joined
    joined=" $(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) " || return 1
    [[ $joined == *" $2 "* ]]
}

# A process that exited but was never reaped (without an init system nobody reaps orphaned
# daemons) still shows in /proc and in pgrep: it is not running.
not_zombie() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $state && $state != Z ]]
}

# stop_pid PID NAME: TERM the process, wait up to 10 s, then KILL
stop_pid() {
    local pid=$1 i
    log "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        if [[ ! -e /proc/$pid ]] || ! not_zombie "$pid"; then break; fi
        sleep 0.1
    done
    if [[ -e /proc/$pid ]] && not_zombie "$pid"; then
        log "$2 (pid $pid) did not exit; sending KILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
}

# stop_pidfile PIDFILE NAME ARG: stop the process the file names if it is NAME run with ARG
stop_pidfile() {
    local pid
    if pid=$(pid_alive "$1" "$2" "$3"); then
        stop_pid "$pid" "$2"
    fi
    rm -f "$1"
}

# --------------------------------------------------------- daemons the lab did not start
# The lab shares libvirtd and virtlogd with whatever else runs on the machine: a daemon running
# before `up` (installed by the distribution, started by another tool or by hand) is used as it
# is, never stopped by `down`, and, when a test stops it (`stop-daemon`), brought back exactly as
# it ran: same binary, arguments, environment and working directory, read from /proc before it
# was stopped (or, under systemd, the same units started again).

# The system daemon's socket: the process listening on it is the one qemu:///system talks to
# (a user's session libvirtd or virtlogd has the same name but not this socket).
system_socket() {
    case $1 in
        libvirtd) printf '%s\n' /run/libvirt/libvirt-sock ;;
        virtlogd) printf '%s\n' /run/libvirt/virtlogd-sock ;;
        *) die "no system socket known for $1" ;;
    esac
}

# serving_pid NAME -> the pid of the root NAME listening on the system socket
serving_pid() {
    local pid
    pid=$(ss -Hxlp src "$(system_socket "$1")" 2>/dev/null |
          grep -o "(\"$1\",pid=[0-9]*" | head -n1 | grep -o '[0-9]*$') || true
    [[ -n $pid && -r /proc/$pid/status ]] || return 1
    not_zombie "$pid" || return 1
    [[ $(awk '$1 == "Uid:" { print $2 }' "/proc/$pid/status") == 0 ]] || return 1
    printf '%s\n' "$pid"
}

# The argument every daemon the lab starts carries (its own config or pid file): how ownership
# is told apart from a daemon of the same name that someone else started.
lab_marker() {
    case $1 in
        libvirtd) printf '%s\n' "$LIBVIRTD_CONF" ;;
        virtlogd) printf '%s\n' "$VIRTLOGD_PID" ;;
        sshd) printf '%s\n' "$SSHD_CONF" ;;
    esac
}

# owned_by_lab NAME PID: the lab started this process (and it is still that process)
owned_by_lab() {
    [[ $(pid_alive "$STATE_DIR/$1.started" "$1" "$(lab_marker "$1")" 2>/dev/null) == "$2" ]]
}

# systemd_unit PID -> the .service the process runs in, when systemd manages it
systemd_unit() {
    [[ -d /run/systemd/system ]] || return 1
    sed -n 's|^0::.*/\([^/]*\.service\)$|\1|p' "/proc/$1/cgroup" 2>/dev/null | grep . | head -n1
}

# same_argv PID FILE: the process runs with exactly the argv recorded in FILE (cmp alone would
# compare sizes first, and /proc files have none)
same_argv() { cmp -s <(cat "/proc/$1/cmdline" 2>/dev/null) "$2"; }

show_argv() { tr '\0' ' ' <"$1" | sed 's/ $//'; }

# stop_daemon NAME: record how the serving NAME runs, then stop it (`up`/`down`/`restore` bring it back)
cmd_stop_daemon() {
    local name=${1:-} pid record unit u active=()
    case $name in
        libvirtd | virtlogd) ;;
        sshd)
            # only the lab's own sshd (its config, its port); `up` starts it again from that config
            pid=$(pid_alive "$SSHD_PID" sshd "$SSHD_CONF") || die "the lab's sshd is not running"
            stop_pid "$pid" sshd
            return 0 ;;
        *) die "usage: $0 stop-daemon libvirtd|virtlogd|sshd" ;;
    esac
    record=$STATE_DIR/$name.stopped
    [[ ! -e $record ]] || die "$name was stopped already and not restored yet ($record)"
    pid=$(serving_pid "$name") || die "no $name serves $(system_socket "$name")"
    mkdir -p "$record.new"
    cp "/proc/$pid/cmdline" "$record.new/argv"
    cp "/proc/$pid/environ" "$record.new/environ"
    readlink "/proc/$pid/exe" | sed 's/ (deleted)$//' >"$record.new/exe"
    readlink "/proc/$pid/cwd" >"$record.new/cwd"
    if owned_by_lab "$name" "$pid"; then echo lab; else echo other; fi >"$record.new/owner"
    if unit=$(systemd_unit "$pid"); then
        active=("$unit")
        # socket activation would start the daemon again on the next connection: stop those too
        for u in "${name}.socket" "${name}-ro.socket" "${name}-admin.socket"; do
            systemctl is-active --quiet "$u" 2>/dev/null && active+=("$u")
        done
        printf '%s\n' "${active[@]}" >"$record.new/units"
    fi
    mv "$record.new" "$record"
    log "stopping $name (pid $pid, $(cat "$record/owner") daemon): $(show_argv "$record/argv")"
    if [[ -s $record/units ]]; then
        mapfile -t active <"$record/units"
        systemctl stop "${active[@]}"
    else
        stop_pid "$pid" "$name"
    fi
}

# restore_daemon NAME: start again the NAME that stop-daemon stopped, exactly as it ran
restore_daemon() {
    local name=$1 record=$STATE_DIR/$1.stopped pid exe i units=()
    [[ -d $record ]] || return 0
    if pid=$(serving_pid "$name"); then
        log "$name already serves again (pid $pid); forgetting how the stopped one ran"
        rm -rf "$record"
        return 0
    fi
    if [[ -s $record/units ]]; then
        mapfile -t units <"$record/units"
        log "restoring $name: systemctl start ${units[*]}"
        systemctl start "${units[@]}"
    else
        exe=$(cat "$record/exe")
        [[ -x $exe ]] || die "cannot restore $name: $exe is gone"
        log "restoring $name ($(cat "$record/owner") daemon) as it ran: $(show_argv "$record/argv")"
        # execve with exactly the recorded binary, argv (argv[0] too), environment (a shell in
        # between would add SHLVL, PWD, _) and working directory; setsid detaches a daemon that
        # does not fork by itself (no -d)
        setsid python3 -c '
import os, sys
record = sys.argv[1]
def read(name):
    with open(os.path.join(record, name), "rb") as handle:
        return handle.read()
argv = read("argv").split(b"\0")[:-1]
env = dict(item.split(b"=", 1) for item in read("environ").split(b"\0") if b"=" in item)
os.chdir(read("cwd").rstrip(b"\n"))
os.execve(read("exe").rstrip(b"\n"), argv, env)
' "$record" </dev/null >/dev/null 2>&1 9>&- &
    fi
    # until the daemon that serves is the one started (a forking daemon's parent may hold the
    # socket for a moment) and runs as recorded; a unit's start may differ, which is then said
    for ((i = 0; i < 100; i++)); do
        pid=$(serving_pid "$name") && same_argv "$pid" "$record/argv" && break
        sleep 0.1
    done
    pid=$(serving_pid "$name") || pid=
    [[ -n $pid ]] || die "$name did not come back (it ran as: $(show_argv "$record/argv"))"
    same_argv "$pid" "$record/argv" ||
        log "note: $name now runs as $(show_argv "/proc/$pid/cmdline") (was: $(show_argv "$record/argv"))"
    if [[ $(cat "$record/owner") == lab ]]; then
        printf '%s\n' "$pid" >"$STATE_DIR/$name.started"
    fi
    rm -rf "$record"
    log "$name restored (pid $pid)"
}

restore_daemons() {
    restore_daemon virtlogd
    restore_daemon libvirtd
}

# ---------------------------------------------------------------- packages
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_CREATED=0
BUILD_TMP=
cleanup_policy() {
    if [[ $POLICY_CREATED -eq 1 ]]; then
        rm -f "$POLICY_RC"
        POLICY_CREATED=0
    fi
}
cleanup() {
    cleanup_policy
    if [[ -n $BUILD_TMP ]]; then
        rm -rf "$BUILD_TMP"
    fi
}

apt_lists_present() {
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}

ensure_packages() {
    local p missing=()
    for p in "${PACKAGES[@]}"; do
        if [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) != installed ]]; then
            missing+=("$p")
        fi
    done
    command -v ss >/dev/null || missing+=(iproute2)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing packages: ${missing[*]}"
    apt_lists_present || apt-get update -q >&2
    # No init system here: maintainer scripts call invoke-rc.d, which fails
    # to start daemons. policy-rc.d exit 101 = "action forbidden" -> skipped.
    if [[ ! -e $POLICY_RC ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
        chmod 0755 "$POLICY_RC"
        POLICY_CREATED=1
    fi
    local -a apt=(apt-get install -y -q --no-install-recommends
                  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" "${missing[@]}" >&2; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" "${missing[@]}" >&2
    fi
    cleanup_policy
}

# ------------------------------------------------------------- guest image
write_init() {
    cat >"$1" <<'EOF'
#!/bin/busybox sh
# playr-lab guest init: wait for the ACPI power button, then power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
insmod /lib/modules/evdev.ko
insmod /lib/modules/button.ko
devs=
i=0
while [ -z "$devs" ] && [ "$i" -lt 50 ]; do
    for e in /sys/class/input/event*; do
        [ -r "$e/device/name" ] || continue
        if [ "$(cat "$e/device/name")" = "Power Button" ]; then
            devs="$devs /dev/input/${e##*/}"
        fi
    done
    [ -n "$devs" ] || { i=$((i + 1)); sleep 0.1; }
done
if [ -z "$devs" ]; then
    echo "playr-lab: no power button input device found; idling"
else
    for d in $devs; do
        # evdev rejects reads shorter than one struct input_event (24 bytes
        # on x86_64) with EINVAL, so read one whole event, not one byte.
        (
            if dd if="$d" of=/dev/null bs=24 count=1 2>/dev/null; then
                echo "playr-lab: power button pressed; powering off"
                poweroff -f
            fi
            echo "playr-lab: reading $d failed"
        ) &
    done
    echo "playr-lab: ready (uptime $(cut -d' ' -f1 /proc/uptime)s), waiting on$devs"
fi
while :; do sleep 3600; done
EOF
    chmod 0755 "$1"
}

# extract_module ROOT NAME DEST: copy NAME.ko[.xz|.zst|.gz] as plain .ko
extract_module() {
    local src
    src=$(find "$1/lib/modules" -type f \( -name "$2.ko" -o -name "$2.ko.*" \) | head -n1)
    [[ -n $src ]] || die "module $2 not found in kernel package"
    case $src in
        *.ko) cp "$src" "$3" ;;
        *.ko.xz) xz -dc "$src" >"$3" ;;
        *.ko.zst) zstd -qdc "$src" >"$3" ;;
        *.ko.gz) gzip -dc "$src" >"$3" ;;
        *) die "unknown module compression: $src" ;;
    esac
}

ensure_guest_image() {
    if [[ -s $KERNEL && -s $INITRD && -f $CACHE_DIR/.complete ]]; then
        return 0
    fi
    local t0 pkg tmp deb
    t0=$(now)
    mkdir -p "$CACHE_DIR"
    chmod 0755 "$CACHE_DIR"
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
          awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
    if [[ -z $pkg ]]; then
        apt-get update -q >&2
        pkg=$(apt-cache depends linux-image-cloud-amd64 |
              awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
    fi
    [[ -n $pkg ]] || die "cannot resolve the kernel package of linux-image-cloud-amd64"
    log "building guest kernel+initrd from $pkg into $CACHE_DIR"
    tmp=$(mktemp -d "$CACHE_DIR/build.XXXXXX")
    BUILD_TMP=$tmp
    (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2)
    deb=$(find "$tmp" -maxdepth 1 -name '*.deb' | head -n1)
    [[ -n $deb ]] || die "apt-get download $pkg produced no .deb"
    dpkg-deb -x "$deb" "$tmp/root"

    local ird=$tmp/initrd
    mkdir -p "$ird"/{bin,dev,proc,sys,lib/modules}
    cp /bin/busybox "$ird/bin/busybox"
    extract_module "$tmp/root" evdev "$ird/lib/modules/evdev.ko"
    extract_module "$tmp/root" button "$ird/lib/modules/button.ko"
    mknod -m 0600 "$ird/dev/console" c 5 1
    write_init "$ird/init"
    (cd "$ird" && find . -print0 |
        cpio --null --create --format=newc --owner=0:0 --quiet) |
        gzip -9 >"$tmp/initrd.img"
    install -m 0644 "$tmp"/root/boot/vmlinuz-* "$KERNEL.new"
    install -m 0644 "$tmp/initrd.img" "$INITRD.new"
    mv -f "$KERNEL.new" "$KERNEL"
    mv -f "$INITRD.new" "$INITRD"
    printf '%s\n' "$pkg" >"$CACHE_DIR/.complete"
    rm -rf "$tmp"
    BUILD_TMP=
    log "guest image built in $(since "$t0")s"
}

# ---------------------------------------------------------------- libvirt
libvirt_ok() { virsh -q -c "$URI" version >/dev/null 2>&1; }

write_libvirtd_conf() {
    cat >"$LIBVIRTD_CONF" <<EOF
# playr-lab libvirtd.conf (used via libvirtd -f); no polkit, no systemd.
unix_sock_group = "$LAB_GROUP"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0770"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:$STATE_DIR/libvirtd.log"
EOF
}

# No udev here, so /dev/kvm stays root:root 0600. libvirt then sees KVM as
# "enabled when probing, but not available now" for the qemu user, throws
# away its capability cache on every lookup and re-probes QEMU: each
# `virsh define` took ~40 s. Apply what Debian's udev rule would
# (root:kvm 0660). Guests are still type='qemu' (TCG), never KVM.
fix_kvm_perms() {
    if [[ -c /dev/kvm ]] && getent group kvm >/dev/null &&
       [[ $(stat -c %G:%a /dev/kvm) != kvm:660 ]]; then
        log "setting /dev/kvm to root:kvm 0660 (what udev would do)"
        chgrp kvm /dev/kvm
        chmod 0660 /dev/kvm
    fi
}

ensure_libvirtd() {
    local i pid
    fix_kvm_perms
    restore_daemons
    if pid=$(serving_pid virtlogd); then
        if owned_by_lab virtlogd "$pid"; then
            log "virtlogd running (pid $pid, started by the lab)"
        else
            log "virtlogd already running (pid $pid, not started by the lab: left as it is)"
        fi
    else
        log "starting virtlogd"
        # 9>&-: daemons must not inherit (and so hold forever) the lock fd
        virtlogd -d -p "$VIRTLOGD_PID" 9>&-
        for ((i = 0; i < 50; i++)); do
            pid_alive "$VIRTLOGD_PID" virtlogd >/dev/null && break
            sleep 0.1
        done
        pid_alive "$VIRTLOGD_PID" virtlogd >"$STATE_DIR/virtlogd.started" || die "virtlogd did not start"
    fi
    if pid=$(serving_pid libvirtd); then
        if owned_by_lab libvirtd "$pid"; then
            log "libvirtd running (pid $pid, started by the lab)"
        else
            log "libvirtd already running (pid $pid, not started by the lab: left as it is): $(show_argv "/proc/$pid/cmdline")"
        fi
    else
        write_libvirtd_conf
        log "starting libvirtd -f $LIBVIRTD_CONF"
        libvirtd -d -f "$LIBVIRTD_CONF" -p "$LIBVIRTD_PID" 9>&-
        for ((i = 0; i < 50; i++)); do
            pid_alive "$LIBVIRTD_PID" libvirtd >/dev/null && break
            sleep 0.1
        done
        pid_alive "$LIBVIRTD_PID" libvirtd >"$STATE_DIR/libvirtd.started" ||
            die "libvirtd did not start; see $STATE_DIR/libvirtd.log"
    fi
    for ((i = 0; i < 150; i++)); do
        libvirt_ok && return 0
        sleep 0.2
    done
    die "libvirt $URI not reachable; see $STATE_DIR/libvirtd.log"
}

# Why the lab user cannot reach qemu:///system, for the error message
libvirt_access_hint() {
    local pid
    pid=$(serving_pid libvirtd) || { printf 'no libvirtd serves %s' "$(system_socket libvirtd)"; return; }
    owned_by_lab libvirtd "$pid" && { printf 'see %s' "$SSHD_LOG"; return; }
    printf 'libvirtd (pid %s, not started by the lab: %s) refuses %s? It must let group %s in ' \
        "$pid" "$(show_argv "/proc/$pid/cmdline")" "$LAB_USER" "$LAB_GROUP"
    printf '(unix_sock_group = "%s", unix_sock_rw_perms = "0770", and auth_unix_rw = "none" or a running ' "$LAB_GROUP"
    printf 'polkitd with libvirt'"'"'s rule for that group); see %s' "$SSHD_LOG"
}

# ---------------------------------------------------------------- user/ssh
ensure_user() {
    getent group "$LAB_GROUP" >/dev/null || groupadd --system "$LAB_GROUP"
    if ! id "$LAB_USER" >/dev/null 2>&1; then
        log "creating user $LAB_USER"
        useradd --system --user-group --create-home --home-dir "/home/$LAB_USER" \
                --shell /bin/bash --groups "$LAB_GROUP" "$LAB_USER"
    fi
    id -nG "$LAB_USER" | tr ' ' '\n' | grep -qx "$LAB_GROUP" ||
        usermod -aG "$LAB_GROUP" "$LAB_USER"
    # useradd leaves the password field "!" (locked); with UsePAM no, sshd
    # refuses even pubkey logins to locked accounts. "*" = no password, unlocked.
    if [[ $(getent shadow "$LAB_USER" | cut -d: -f2) == '!'* ]]; then
        usermod -p '*' "$LAB_USER"
    fi
    if [[ ! -s $CLIENT_KEY ]]; then
        rm -f "$CLIENT_KEY" "$CLIENT_KEY.pub"
        ssh-keygen -q -t ed25519 -N '' -C "playr-lab-client" -f "$CLIENT_KEY"
    fi
    local home ssh_dir
    home=$(getent passwd "$LAB_USER" | cut -d: -f6)
    ssh_dir=$home/.ssh
    install -d -m 0700 -o "$LAB_USER" -g "$LAB_USER" "$ssh_dir"
    if ! cmp -s "$CLIENT_KEY.pub" "$ssh_dir/authorized_keys"; then
        install -m 0600 -o "$LAB_USER" -g "$LAB_USER" "$CLIENT_KEY.pub" "$ssh_dir/authorized_keys"
    fi
}

port_free() { [[ -z $(ss -Hltn "sport = :$1") ]]; }

choose_port() {
    local p
    if [[ -n ${LAB_SSH_PORT:-} ]]; then
        printf '%s\n' "$LAB_SSH_PORT"
        return
    fi
    if [[ -s $PORT_FILE ]]; then
        p=$(cat "$PORT_FILE")
        if pid_alive "$SSHD_PID" sshd "$SSHD_CONF" >/dev/null || port_free "$p"; then
            printf '%s\n' "$p"
            return
        fi
    fi
    for ((p = 2222; p < 2322; p++)); do
        if port_free "$p"; then
            printf '%s\n' "$p"
            return
        fi
    done
    die "no free port in 2222-2321; set LAB_SSH_PORT"
}

write_sshd_conf() {
    cat >"$SSHD_CONF" <<EOF
# playr-lab sshd (started as: sshd -f $SSHD_CONF -E $SSHD_LOG)
Port $1
ListenAddress 127.0.0.1
HostKey $HOST_KEY
PidFile $SSHD_PID
UsePAM no
PubkeyAuthentication yes
AuthenticationMethods publickey
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
PermitRootLogin no
AllowUsers $LAB_USER
AuthorizedKeysFile .ssh/authorized_keys
StrictModes yes
LogLevel VERBOSE
MaxSessions 10
MaxStartups 10:30:100
X11Forwarding no
PrintMotd no
PrintLastLog no
Subsystem sftp internal-sftp
EOF
}

ensure_sshd() {
    local port pid i
    port=$(choose_port)
    if [[ ! -s $HOST_KEY ]]; then
        rm -f "$HOST_KEY" "$HOST_KEY.pub"
        ssh-keygen -q -t ed25519 -N '' -C "playr-lab-host" -f "$HOST_KEY"
    fi
    printf '[127.0.0.1]:%s %s\n' "$port" "$(cut -d' ' -f1,2 "$HOST_KEY.pub")" >"$KNOWN_HOSTS"
    if pid=$(pid_alive "$SSHD_PID" sshd "$SSHD_CONF") && [[ $(cat "$PORT_FILE" 2>/dev/null) == "$port" ]]; then
        log "sshd already running (pid $pid, port $port)"
        return 0
    fi
    stop_pidfile "$SSHD_PID" sshd "$SSHD_CONF"
    port_free "$port" || die "port $port is in use by something else"
    write_sshd_conf "$port"
    mkdir -p /run/sshd
    chmod 0755 /run/sshd
    /usr/sbin/sshd -t -f "$SSHD_CONF"
    log "starting sshd on 127.0.0.1:$port"
    /usr/sbin/sshd -f "$SSHD_CONF" -E "$SSHD_LOG" 9>&-
    for ((i = 0; i < 50; i++)); do
        pid_alive "$SSHD_PID" sshd "$SSHD_CONF" >/dev/null && ! port_free "$port" && break
        sleep 0.1
    done
    pid_alive "$SSHD_PID" sshd "$SSHD_CONF" >/dev/null || die "sshd did not start; see $SSHD_LOG"
    printf '%s\n' "$port" >"$PORT_FILE"
}

lab_ssh() {
    ssh -i "$CLIENT_KEY" -p "$(cat "$PORT_FILE")" \
        -o UserKnownHostsFile="$KNOWN_HOSTS" -o StrictHostKeyChecking=yes \
        -o BatchMode=yes -o IdentitiesOnly=yes -o ConnectTimeout=10 \
        "$LAB_USER@127.0.0.1" "$@"
}

# ----------------------------------------------------------------- guests
domain_xml() {
    local name=$1 disk=${2:-}
    cat <<EOF
<domain type='qemu'>
  <name>$name</name>
  <description>playr lab guest (scripts/lab.sh)</description>
  <memory unit='MiB'>$GUEST_MEM_MIB</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$KERNEL</kernel>
    <initrd>$INITRD</initrd>
    <cmdline>$GUEST_CMDLINE</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
EOF
    if [[ -n $disk ]]; then
        cat <<EOF
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
EOF
    fi
    cat <<EOF
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path='$STATE_DIR/console-$name.log'/>
    </serial>
    <console type='file'>
      <source path='$STATE_DIR/console-$name.log'/>
      <target type='serial'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

domain_defined() { virsh -c "$URI" dominfo --domain "$1" >/dev/null 2>&1; }

# --- consoles (issue 17) ---------------------------------------------------------------------
# The console guest boots the same kernel with the lab initrd plus one more cpio archive appended
# (the kernel unpacks concatenated archives in order) holding /console-init: a busybox shell on
# ttyS0, started again whenever it exits. Its serial port is a pty (what `virsh console` needs)
# and it has VNC graphics on 127.0.0.1 (autoport), so both console kinds have something to reach.
write_console_init() {
    cat >"$1" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "playr-lab: console ready" >/dev/ttyS0
while :; do
    setsid cttyhack sh -i </dev/ttyS0 >/dev/ttyS0 2>&1
done
EOF
    chmod 0755 "$1"
}

ensure_console_initrd() {
    [[ -s $CONSOLE_INITRD && $CONSOLE_INITRD -nt $INITRD ]] && return 0
    local tmp
    tmp=$(mktemp -d "$CACHE_DIR/console.XXXXXX")
    write_console_init "$tmp/console-init"
    (cd "$tmp" && printf 'console-init\0' |
        cpio --null --create --format=newc --owner=0:0 --quiet | gzip -9 >"$tmp/extra.img")
    cat "$INITRD" "$tmp/extra.img" >"$CONSOLE_INITRD.new"
    mv -f "$CONSOLE_INITRD.new" "$CONSOLE_INITRD"
    rm -rf "$tmp"
    log "console guest initrd built"
}

console_domain_xml() {
    cat <<EOF
<domain type='qemu'>
  <name>$CONSOLE_GUEST</name>
  <description>playr lab console guest (scripts/lab.sh): a shell on ttyS0, VNC on 127.0.0.1</description>
  <memory unit='MiB'>$GUEST_MEM_MIB</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$KERNEL</kernel>
    <initrd>$CONSOLE_INITRD</initrd>
    <cmdline>console=ttyS0 quiet loglevel=3 rdinit=/console-init</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <graphics type='vnc' listen='127.0.0.1' autoport='yes'/>
    <video><model type='vga'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

ensure_console_guest() {
    ensure_console_initrd
    domain_defined "$CONSOLE_GUEST" && return 0
    console_domain_xml >"$STATE_DIR/$CONSOLE_GUEST.xml"
    vsh define --file "$STATE_DIR/$CONSOLE_GUEST.xml" >/dev/null
    log "defined $CONSOLE_GUEST"
}

define_domain() {
    local xml=$STATE_DIR/$1.xml
    domain_xml "$@" >"$xml"
    vsh define --file "$xml" >/dev/null
    log "defined $1"
}

ensure_guests() {
    local g disk=$STATE_DIR/$DISK_GUEST.qcow2
    for g in "${BOOT_GUESTS[@]}"; do
        domain_defined "$g" || define_domain "$g"
    done
    if domain_defined "$DISK_GUEST" && [[ ! -s $disk ]]; then
        log "$DISK_GUEST is defined but $disk is missing; redefining"
        vsh undefine --domain "$DISK_GUEST" --snapshots-metadata >/dev/null
    fi
    if ! domain_defined "$DISK_GUEST"; then
        rm -f "$disk"
        qemu-img create -q -f qcow2 "$disk" 16M
        define_domain "$DISK_GUEST" "$disk"
        # internal snapshots must work on the shut-off domain
        vsh snapshot-create-as --domain "$DISK_GUEST" --name lab-selftest >/dev/null
        vsh snapshot-list --domain "$DISK_GUEST" --name | grep -qx lab-selftest ||
            die "snapshot self-test: lab-selftest not listed"
        vsh snapshot-delete --domain "$DISK_GUEST" --snapshotname lab-selftest >/dev/null
        log "snapshot create/list/delete on $DISK_GUEST: ok"
    fi
}

remove_guests() {
    local g
    libvirt_ok || { log "libvirt not reachable; cannot remove guests"; return 0; }
    for g in "${ALL_GUESTS[@]}" "$CONSOLE_GUEST"; do
        domain_defined "$g" || continue
        if [[ $(virsh -c "$URI" domstate --domain "$g" 2>/dev/null) != "shut off" ]]; then
            vsh destroy --domain "$g" >/dev/null 2>&1 || true
        fi
        vsh undefine --domain "$g" --snapshots-metadata >/dev/null
        log "removed $g"
    done
    rm -f "$STATE_DIR/$DISK_GUEST.qcow2"
}

# ------------------------------------------------ provisioning: pool, network, cloud image (issue 16)
# A dir storage pool, an ISOLATED network (no <forward>: DHCP on its own bridge, nothing leaves the
# machine) and a tiny bootable "cloud image" in the pool: a partitionless FAT disk (syslinux
# installed by mtools, no loop mount) holding the lab kernel and an initrd whose init mounts the
# cloud-init "cidata" CD, applies the hostname, prints what it read on the serial console and asks
# DHCP. The portal's provisioning tests create VMs over it (tests/lab/test_provisioning_lab.py).
PROV_POOL=playr-lab-pool
PROV_POOL_DIR=$STATE_DIR/pool
PROV_NET=playr-lab-net
PROV_BRIDGE=virbr-playr
PROV_SUBNET=192.168.123
PROV_BASE=lab-cloud-base.qcow2
PROV_INITRD=$CACHE_DIR/cloud-initrd.img
PROV_IMAGE_VERSION=4  # bump when write_cloud_init or PROV_MODULES change (both are rebuilt)
# the portal attaches the seed CD on virtio-scsi (Debian's cloud kernel has no AHCI driver)
# (in dependency order: since Debian's 6.1.0-57 cloud kernel, virtio needs virtio_ring loaded first;
# the init also loads them in three passes, so a newer kernel's new dependency cannot leave the CD out)
PROV_MODULES=(scsi_common scsi_mod cdrom sr_mod isofs virtio_ring virtio virtio_pci_legacy_dev
              virtio_pci_modern_dev virtio_pci virtio_scsi failover net_failover virtio_net)

write_cloud_init() {
    cat >"$1" <<'EOF'
#!/bin/busybox sh
# playr-lab cloud image init: read the NoCloud seed (label cidata), apply the hostname, say what
# was read on the serial console, ask DHCP, then idle (the ACPI power button powers off).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
for pass in 1 2 3; do
    for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m.ko" 2>/dev/null; done
done
insmod /lib/modules/evdev.ko 2>/dev/null
insmod /lib/modules/button.ko 2>/dev/null
mkdir -p /seed
i=0
seed=
# up to 30 s: under TCG on a loaded machine the CD-ROM can appear well after the first 10 s
while [ -z "$seed" ] && [ "$i" -lt 300 ]; do
    for d in /dev/sr0 /dev/sr1; do
        [ -b "$d" ] || continue
        if mount -t iso9660 -o ro "$d" /seed 2>/dev/null; then
            if [ -r /seed/meta-data ]; then seed=$d; break; fi
            umount /seed
        fi
    done
    [ -n "$seed" ] || { i=$((i + 1)); sleep 0.1; }
done
if [ -z "$seed" ]; then
    echo "playr-cloud: no cidata seed found"
else
    name=$(sed -n 's/^local-hostname: *//p' /seed/meta-data | head -n1)
    [ -n "$name" ] && hostname "$name"
    echo "playr-cloud: seed $seed (uptime $(cut -d' ' -f1 /proc/uptime)s) instance-id=$(sed -n 's/^instance-id: *//p' /seed/meta-data | head -n1)"
    echo "playr-cloud: hostname=$(hostname)"
    grep -o 'ssh-[a-z0-9-]* [A-Za-z0-9+/=]*' /seed/user-data | sed 's/^/playr-cloud: key=/'
fi
ip link set lo up
for e in /sys/class/net/e*; do
    [ -e "$e" ] || continue
    n=${e##*/}
    ip link set "$n" up
    if udhcpc -i "$n" -n -q -t 10 -T 1 -s /bin/true >/dev/null 2>&1; then
        echo "playr-cloud: dhcp on $n: ok"
    else
        echo "playr-cloud: dhcp on $n: no lease"
    fi
done
echo "playr-cloud: ready (uptime $(cut -d' ' -f1 /proc/uptime)s)"
for d in /dev/input/event*; do
    ( dd if="$d" of=/dev/null bs=24 count=1 2>/dev/null && poweroff -f ) &
done
while :; do sleep 3600; done
EOF
    chmod 0755 "$1"
}

ensure_cloud_initrd() {
    [[ -s $PROV_INITRD && $(cat "$CACHE_DIR/.cloud-complete" 2>/dev/null) == "$PROV_IMAGE_VERSION" ]] && return 0
    local pkg tmp deb m
    pkg=$(cat "$CACHE_DIR/.complete")
    log "building the cloud image's initrd from $pkg"
    tmp=$(mktemp -d "$CACHE_DIR/build.XXXXXX")
    BUILD_TMP=$tmp
    (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2)
    deb=$(find "$tmp" -maxdepth 1 -name '*.deb' | head -n1)
    [[ -n $deb ]] || die "apt-get download $pkg produced no .deb"
    dpkg-deb -x "$deb" "$tmp/root"
    local ird=$tmp/initrd
    mkdir -p "$ird"/{bin,dev,proc,sys,lib/modules}
    cp /bin/busybox "$ird/bin/busybox"
    for m in "${PROV_MODULES[@]}" evdev button; do
        extract_module "$tmp/root" "$m" "$ird/lib/modules/$m.ko"
    done
    printf '%s\n' "${PROV_MODULES[@]}" >"$ird/lib/modules/order"
    mknod -m 0600 "$ird/dev/console" c 5 1
    write_cloud_init "$ird/init"
    (cd "$ird" && find . -print0 |
        cpio --null --create --format=newc --owner=0:0 --quiet) |
        gzip -9 >"$PROV_INITRD.new"
    mv -f "$PROV_INITRD.new" "$PROV_INITRD"
    printf '%s\n' "$PROV_IMAGE_VERSION" >"$CACHE_DIR/.cloud-complete"
    rm -rf "$tmp"
    BUILD_TMP=
}

ensure_prov_pool() {
    if ! virsh -c "$URI" pool-info --pool "$PROV_POOL" >/dev/null 2>&1; then
        mkdir -p "$PROV_POOL_DIR"
        vsh pool-define-as --name "$PROV_POOL" --type dir --target "$PROV_POOL_DIR" >/dev/null
        log "defined pool $PROV_POOL ($PROV_POOL_DIR)"
    fi
    if [[ $(virsh -c "$URI" pool-info --pool "$PROV_POOL" | awk '$1 == "State:" { print $2 }') != running ]]; then
        mkdir -p "$PROV_POOL_DIR"
        vsh pool-start --pool "$PROV_POOL" >/dev/null
    fi
    vsh pool-autostart --pool "$PROV_POOL" >/dev/null
}

ensure_prov_network() {
    if ! virsh -c "$URI" net-info --network "$PROV_NET" >/dev/null 2>&1; then
        cat >"$STATE_DIR/$PROV_NET.xml" <<EOF
<network>
  <name>$PROV_NET</name>
  <bridge name='$PROV_BRIDGE' stp='on' delay='0'/>
  <ip address='$PROV_SUBNET.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='$PROV_SUBNET.10' end='$PROV_SUBNET.200'/>
    </dhcp>
  </ip>
</network>
EOF
        vsh net-define --file "$STATE_DIR/$PROV_NET.xml" >/dev/null
        log "defined isolated network $PROV_NET ($PROV_BRIDGE, $PROV_SUBNET.0/24)"
    fi
    if [[ $(virsh -c "$URI" net-info --network "$PROV_NET" | awk '$1 == "Active:" { print $2 }') != yes ]]; then
        vsh net-start --network "$PROV_NET" >/dev/null
    fi
}

ensure_cloud_image() {
    # rebuilt when the image's recipe (init, modules) changes: its version is kept beside the pool
    if virsh -c "$URI" vol-info --pool "$PROV_POOL" --vol "$PROV_BASE" >/dev/null 2>&1; then
        [[ $(cat "$STATE_DIR/cloud-image.version" 2>/dev/null) == "$PROV_IMAGE_VERSION" ]] && return 0
        log "cloud image recipe changed; rebuilding $PROV_BASE"
        vsh vol-delete --pool "$PROV_POOL" --vol "$PROV_BASE" >/dev/null
    fi
    ensure_cloud_initrd
    local tmp=$STATE_DIR/cloud-build
    rm -rf "$tmp"; mkdir -p "$tmp"
    mkfs.fat -C -n PLAYRCLOUD "$tmp/disk.img" 65536 >/dev/null  # 64 MiB, no partition table
    cat >"$tmp/syslinux.cfg" <<EOF
DEFAULT cloud
PROMPT 0
TIMEOUT 1
LABEL cloud
  KERNEL vmlinuz
  INITRD initrd.img
  APPEND $GUEST_CMDLINE
EOF
    cp "$KERNEL" "$tmp/vmlinuz"
    cp "$PROV_INITRD" "$tmp/initrd.img"
    mcopy -i "$tmp/disk.img" "$tmp/vmlinuz" "$tmp/initrd.img" "$tmp/syslinux.cfg" ::/
    syslinux --install "$tmp/disk.img"
    qemu-img convert -q -f raw -O qcow2 "$tmp/disk.img" "$PROV_POOL_DIR/$PROV_BASE"
    vsh pool-refresh --pool "$PROV_POOL" >/dev/null
    rm -rf "$tmp"
    printf '%s\n' "$PROV_IMAGE_VERSION" >"$STATE_DIR/cloud-image.version"
    log "cloud image $PROV_BASE in pool $PROV_POOL"
}

ensure_provisioning() {
    ensure_prov_pool
    ensure_prov_network
    ensure_cloud_image
}

# --------------------------------------------------------------------- env
print_env() {
    local hostkey
    hostkey=$(cut -d' ' -f1,2 "$HOST_KEY.pub")
    cat <<EOF
LAB_HOST=127.0.0.1
LAB_SSH_PORT=$(cat "$PORT_FILE")
LAB_USER=$LAB_USER
LAB_KEY=$CLIENT_KEY
LAB_HOST_KEY='$hostkey'
LAB_KNOWN_HOSTS=$KNOWN_HOSTS
LAB_SSHD_LOG=$SSHD_LOG
LAB_URI=$URI
LAB_GUESTS='${ALL_GUESTS[*]}'
LAB_STATE_DIR=$STATE_DIR
LAB_POOL=$PROV_POOL
LAB_NETWORK=$PROV_NET
LAB_BASE_VOLUME=$PROV_BASE
LAB_CONSOLE_GUEST=$CONSOLE_GUEST
EOF
}

# ---------------------------------------------------------------- commands
cmd_up() {
    local t0 t
    t0=$(now)
    need_root
    lock_state
    trap cleanup EXIT
    t=$(now); ensure_packages; log "packages: $(since "$t")s"
    t=$(now); ensure_guest_image; log "guest image: $(since "$t")s"
    t=$(now); ensure_libvirtd; log "libvirtd: $(since "$t")s"
    t=$(now); ensure_user; ensure_sshd; log "user+sshd: $(since "$t")s"
    t=$(now)
    lab_ssh virsh -q -c "$URI" list --all >/dev/null ||
        die "ssh $LAB_USER@127.0.0.1 virsh list failed: $(libvirt_access_hint)"
    log "ssh as $LAB_USER + virsh list: ok ($(since "$t")s)"
    t=$(now); ensure_guests; log "guests: $(since "$t")s"
    t=$(now); ensure_provisioning; log "provisioning pool, network, image: $(since "$t")s"
    ensure_console_guest  # consoles (issue 17)
    print_env >"$ENV_FILE.new"
    mv -f "$ENV_FILE.new" "$ENV_FILE"
    log "up done in $(since "$t0")s; env in $ENV_FILE"
    cat "$ENV_FILE"
}

cmd_down() {
    need_root
    [[ -d $STATE_DIR ]] || { log "nothing to do ($STATE_DIR absent)"; return 0; }
    lock_state
    # a daemon a test stopped comes back first: one the lab did not start must outlive the lab,
    # and removing the guests needs libvirtd anyway
    restore_daemons
    remove_guests
    stop_pidfile "$SSHD_PID" sshd "$SSHD_CONF"
    # only what the lab started, and only while it is still that process
    if [[ -s $STATE_DIR/libvirtd.started ]]; then
        stop_pidfile "$STATE_DIR/libvirtd.started" libvirtd "$LIBVIRTD_CONF"
        rm -f "$LIBVIRTD_PID"
    fi
    if [[ -s $STATE_DIR/virtlogd.started ]]; then
        stop_pidfile "$STATE_DIR/virtlogd.started" virtlogd "$VIRTLOGD_PID"
        rm -f "$VIRTLOGD_PID"
    fi
    rm -f "$ENV_FILE"
    log "down done"
}

cmd_status() {
    local pid d rc=0
    if pid=$(pid_alive "$SSHD_PID" sshd "$SSHD_CONF"); then
        echo "sshd: running (pid $pid, 127.0.0.1:$(cat "$PORT_FILE"))"
    else
        echo "sshd: not running"; rc=1
    fi
    for d in libvirtd virtlogd; do
        if pid=$(serving_pid "$d"); then
            if owned_by_lab "$d" "$pid"; then
                echo "$d: running (pid $pid, started by lab)"
            else
                echo "$d: running (pid $pid, not started by lab): $(show_argv "/proc/$pid/cmdline")"
            fi
        else
            echo "$d: not running$([[ -d $STATE_DIR/$d.stopped ]] && echo ' (stopped by stop-daemon; up restores it)')"
            rc=1
        fi
    done
    if libvirt_ok; then
        echo "guests:"
        virsh -c "$URI" list --all | sed 's/^/  /'
    fi
    [[ -s $ENV_FILE ]] && { echo "env ($ENV_FILE):"; sed 's/^/  /' "$ENV_FILE"; }
    return "$rc"
}

# wait-ready NAME [TIMEOUT]: wait until the running guest's init listens for
# the power button (an ACPI press before that is lost; see docs/lab.md).
cmd_wait_ready() {
    local name=${1:-} timeout=${2:-30} console last
    [[ -n $name ]] || die "usage: $0 wait-ready NAME [TIMEOUT_SECONDS]"
    console=$STATE_DIR/console-$name.log
    local deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        if [[ $(virsh -c "$URI" domstate --domain "$name" 2>/dev/null) == running && -r $console ]]; then
            last=$(grep -E '^playr-lab: (ready|power button)' "$console" | tail -n1 || true)
            [[ $last == 'playr-lab: ready'* ]] && return 0
        fi
        sleep 0.2
    done
    die "$name not ready within ${timeout}s (console: $console)"
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    wait-ready) shift; cmd_wait_ready "$@" ;;
    stop-daemon) shift; need_root; lock_state; cmd_stop_daemon "$@" ;;
    restore) need_root; lock_state; restore_daemons ;;
    *) echo "usage: $0 up|down|status|wait-ready NAME [TIMEOUT]|stop-daemon libvirtd|virtlogd|sshd|restore" >&2
       exit 2 ;;
esac
