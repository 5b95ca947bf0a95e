#!/usr/bin/env bash
# Enroll this hypervisor with a PlayrServers portal, or remove the enrollment.
#
# Run as root on the hypervisor, next to agent_shell.py (copy both files, or clone the repository):
#
#   ./agent-install.sh --portal https://portal.example.com [options]     (asks for your API key)
#   ./agent-install.sh --uninstall       (with PLAYR_API_KEY set, it deletes the agent in the portal too)
#
# What it does (each step only if not done already, so running it again changes nothing):
#   - installs the restricted shell as /usr/local/libexec/playr-agent-shell and its settings in
#     /etc/playr-agent/shell.conf (the libvirt URIs it may connect to, its log file);
#   - creates the system user (default playr-agent) in group libvirt, home /var/lib/playr-agent;
#   - registers the host with the portal (POST /agents with generate_key: true and this host's own
#     SSH host key from /etc/ssh, so the portal pins the real key: no trust on first use);
#   - writes the portal's public key into the user's authorized_keys with restrict,pty,command="<shell>":
#     that key can run the portal's virsh commands and nothing else;
#   - records the agent id and portal URL in /etc/playr-agent/agent.conf and prints AGENT_ID=<id>.
# After POST /agents/{id}/rotate-key in the portal, run it again to install the new public key.
#
# The API key is asked for on the terminal, or read from the environment variable PLAYR_API_KEY
# (automation); it is never written to disk, never appears in a command line and never follows
# a redirect. The portal must be https:// (http:// only on loopback, or with --insecure-http).
#
# Options:
#   --portal URL          portal base URL (or PLAYR_PORTAL_URL)
#   --name NAME           agent name in the portal (default: short host name)
#   --address HOST        address the portal reaches this host's sshd at (default: hostname -f)
#   --ssh-port PORT       sshd port the portal uses (default: sshd's configured Port, else 22)
#   --user USER           system user the portal logs in as (default: playr-agent)
#   --libvirt-uri URI     libvirt URI the portal drives (default: qemu:///system)
#   --pools LIST          storage pools the portal may create, upload, clone and delete volumes in,
#                         comma-separated (default: default); VM disks must be volumes of these
#   --host-key FILE       this host's public host key (default: /etc/ssh/ssh_host_ed25519_key.pub,
#                         then the ecdsa and rsa ones)
#   --insecure-http       allow a plain http:// portal that is not on loopback (the key would cross
#                         the network in clear)
#   --uninstall           remove everything this script added
set -euo pipefail

SHELL_PATH=/usr/local/libexec/playr-agent-shell
CONFIG_DIR=/etc/playr-agent
LOG_DIR=/var/log/playr-agent
HOME_DIR=/var/lib/playr-agent
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

portal="${PLAYR_PORTAL_URL:-}"
name=""
address=""
ssh_port=""
agent_user=playr-agent
libvirt_uri="qemu:///system"
pools="default"
host_key_file=""
uninstall=false
insecure_http=false

say() { printf 'agent-install: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --portal) portal="${2:?--portal needs a URL}"; shift 2 ;;
        --name) name="${2:?--name needs a value}"; shift 2 ;;
        --address) address="${2:?--address needs a value}"; shift 2 ;;
        --ssh-port) ssh_port="${2:?--ssh-port needs a value}"; shift 2 ;;
        --user) agent_user="${2:?--user needs a value}"; shift 2 ;;
        --libvirt-uri) libvirt_uri="${2:?--libvirt-uri needs a value}"; shift 2 ;;
        --pools) pools="${2?--pools needs a list (may be empty)}"; shift 2 ;;
        --host-key) host_key_file="${2:?--host-key needs a file}"; shift 2 ;;
        --uninstall) uninstall=true; shift ;;
        --insecure-http) insecure_http=true; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[ "$(id -u)" = 0 ] || die "run as root (it creates a system user and writes to /etc)"
command -v python3 >/dev/null || die "python3 is needed (apt-get install python3-minimal)"
[[ "$agent_user" =~ ^[a-z_][a-z0-9_-]{0,30}$ ]] || die "--user must be a plain system user name"
[[ "$pools" =~ ^[A-Za-z0-9_.,:@=%+-]*$ ]] || die "--pools must be comma-separated pool names"

# The portal's HTTP API, spoken by python3 (no curl needed, and the key stays in the environment).
# Usage: portal_call METHOD PATH [JSON_BODY]; prints the status code, a newline, then the body.
portal_call() {
    PORTAL_URL="$portal" python3 - "$@" <<'PYTHON'
import json, os, sys, urllib.error, urllib.request
method, path = sys.argv[1], sys.argv[2]
body = sys.argv[3].encode() if len(sys.argv) > 3 else None
class NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect is answered as the error it is; the key never follows one
request = urllib.request.Request(os.environ["PORTAL_URL"].rstrip("/") + path, data=body, method=method)
request.add_unredirected_header("Authorization", "Bearer " + os.environ["PLAYR_API_KEY"])
request.add_header("Accept", "application/json")
if body is not None:
    request.add_header("Content-Type", "application/json")
try:
    with urllib.request.build_opener(NoRedirects).open(request, timeout=30) as response:
        status, text = response.status, response.read().decode()
except urllib.error.HTTPError as error:
    status, text = error.code, error.read().decode(errors="replace")
except (urllib.error.URLError, OSError) as error:
    print(f"agent-install: error: cannot reach the portal at {os.environ['PORTAL_URL']}: {error}", file=sys.stderr)
    sys.exit(1)
print(status)
print(text)
PYTHON
}

# One field of a JSON document on stdin (e.g. json_field id).
json_field() {
    python3 -c 'import json, sys; value = json.load(sys.stdin).get(sys.argv[1]); print("" if value is None else value)' "$1"
}

# The problem detail of a portal error answer, for messages.
problem_text() {
    python3 -c 'import json, sys
text = sys.stdin.read()
try:
    body = json.loads(text)
    fields = ["[%s: %s]" % (e.get("field"), e.get("message")) for e in body.get("errors") or []]
    print(body.get("code", "?"), "-", body.get("detail", ""), *fields)
except (ValueError, AttributeError, TypeError):
    print("unexpected answer:", text[:200].replace("\n", " "))'
}

need_api_key() {
    if [ -z "${PLAYR_API_KEY:+set}" ]; then
        [ -t 0 ] || die "set PLAYR_API_KEY to a portal API key (it is not stored anywhere)"
        read -r -s -p "Portal API key: " PLAYR_API_KEY; echo >&2
    fi
    export PLAYR_API_KEY
}

# What an earlier run recorded: the portal, the agent id there, and the user it created.
read_state() {
    agent_id="" recorded_user="" recorded_portal="" created_libexec=no
    if [ -f "$CONFIG_DIR/agent.conf" ]; then
        [ "$(sed -n 's/^CREATED_LIBEXEC=//p' "$CONFIG_DIR/agent.conf")" != yes ] || created_libexec=yes
        agent_id=$(sed -n 's/^AGENT_ID=\([0-9]*\)$/\1/p' "$CONFIG_DIR/agent.conf")
        recorded_portal=$(sed -n 's/^PORTAL_URL=//p' "$CONFIG_DIR/agent.conf")
        recorded_user=$(sed -n 's/^AGENT_USER=//p' "$CONFIG_DIR/agent.conf")
        [[ "$recorded_user" =~ ^[a-z_][a-z0-9_-]{0,30}$ ]] || recorded_user=""
        [ -z "$recorded_user" ] || agent_user=$recorded_user
    fi
    if [ -z "$portal" ]; then
        portal=$recorded_portal
    elif [ -n "$agent_id" ] && [ "${portal%/}" != "${recorded_portal%/}" ]; then
        say "agent $agent_id was registered with $recorded_portal; registering with $portal anew"
        agent_id=""  # an id means nothing on another portal (it may be another of your hosts there)
    fi
}

# True when USER is the account an earlier run of this script created.
created_here() {
    [ -n "$recorded_user" ] && [ "$1" = "$recorded_user" ] && id "$1" >/dev/null 2>&1 \
        && [ "$(getent passwd "$1" | cut -d: -f6)" = "$HOME_DIR" ]
}

# Write FILE with MODE and OWNER only if its content would change (re-runs leave it untouched).
put_file() {
    local file=$1 mode=$2 owner=$3 content=$4
    if [ -f "$file" ] && [ "$(cat "$file")" = "$content" ]; then
        return 0
    fi
    local tmp
    tmp=$(mktemp "$file.XXXXXX")
    printf '%s\n' "$content" >"$tmp"
    chmod "$mode" "$tmp"
    chown "$owner" "$tmp"
    mv -f "$tmp" "$file"
    say "wrote $file"
}

do_uninstall() {
    read_state
    if [ -n "$agent_id" ] && [ -n "${PLAYR_API_KEY:+set}" ] && [ -n "$portal" ]; then
        local answer status
        answer=$(portal_call DELETE "/agents/$agent_id")
        status=$(head -n 1 <<<"$answer")
        case "$status" in
            204) say "deleted agent $agent_id in the portal" ;;
            404) say "agent $agent_id was already gone from the portal" ;;
            *) die "the portal refused to delete agent $agent_id: $(tail -n +2 <<<"$answer" | problem_text)" ;;
        esac
    elif [ -n "$agent_id" ]; then
        say "agent $agent_id stays registered in the portal (set PLAYR_API_KEY to delete it too, or DELETE /agents/$agent_id)"
    fi
    if created_here "$agent_user"; then
        pkill -u "$agent_user" 2>/dev/null || true
        userdel --remove "$agent_user" 2>/dev/null || userdel "$agent_user"
        say "removed user $agent_user"
    elif id "$agent_user" >/dev/null 2>&1; then
        say "user $agent_user was not created by this script (no record in $CONFIG_DIR): left alone"
    fi
    rm -rf "$HOME_DIR" "$CONFIG_DIR" "$LOG_DIR"
    rm -f "$SHELL_PATH"
    [ "$created_libexec" != yes ] || rmdir /usr/local/libexec 2>/dev/null || true
    say "uninstalled"
}

if $uninstall; then
    do_uninstall
    exit 0
fi

[ -f "$here/agent_shell.py" ] || die "agent_shell.py must be next to this script ($here)"
command -v virsh >/dev/null || die "virsh not found: install libvirt (apt-get install libvirt-daemon-system libvirt-clients)"
getent group libvirt >/dev/null || die "group libvirt does not exist: install libvirt-daemon-system first"
read_state
[ -n "$portal" ] || die "--portal URL is required (the portal's base URL, e.g. https://portal.example.com)"
loopback='^http://(127\.[0-9]+\.[0-9]+\.[0-9]+|localhost|\[::1\])(:[0-9]+)?(/.*)?$'
if [[ "$portal" == https://* || "$portal" =~ $loopback ]]; then
    :  # encrypted, or never leaves this host
elif [[ "$portal" == http://* ]]; then
    $insecure_http || die "refusing to send the API key over plain http to $portal (use https, or --insecure-http)"
else
    die "--portal must be an http(s) URL, e.g. https://portal.example.com"
fi
if id "$agent_user" >/dev/null 2>&1 && ! created_here "$agent_user"; then
    die "user $agent_user already exists and was not created by this script; pick another --user"
fi
need_api_key

# This host's identity, as the portal will see it.
[ -n "$name" ] || name=$(hostname -s)
[ -n "$address" ] || address=$(hostname -f 2>/dev/null || hostname)
if [ -z "$ssh_port" ]; then
    ssh_port=$( { sshd -T 2>/dev/null || true; } | awk '$1 == "port" { print $2; exit }')
    [ -n "$ssh_port" ] || ssh_port=22
fi
if [ -z "$host_key_file" ]; then
    for candidate in /etc/ssh/ssh_host_ed25519_key.pub /etc/ssh/ssh_host_ecdsa_key.pub /etc/ssh/ssh_host_rsa_key.pub; do
        if [ -f "$candidate" ]; then host_key_file=$candidate; break; fi
    done
fi
{ [ -n "$host_key_file" ] && [ -f "$host_key_file" ]; } || die "no SSH host key found in /etc/ssh (is openssh-server installed?); pass --host-key FILE"
host_key=$(awk 'NF >= 2 { print $1, $2; exit }' "$host_key_file")
virsh_path=$(command -v virsh)

# 1. The restricted shell and its settings.
if [ ! -d /usr/local/libexec ]; then
    install -d -m 0755 -o root -g root /usr/local/libexec
    created_libexec=yes  # recorded, so that --uninstall removes it again (and only then)
fi
install -d -m 0755 -o root -g root "$CONFIG_DIR"
# The shell runs with this host's python3 (its first line names it), isolated (-I) and without site (-S).
# (The system's python3 when there is one: root's PATH may lead to an interpreter the agent user cannot read.)
python=/usr/bin/python3
[ -x "$python" ] || python=$(command -v python3)
put_file "$SHELL_PATH" 0755 root:root "$(sed "1s|^#!.*|#!$python -IS|" "$here/agent_shell.py")"
put_file "$CONFIG_DIR/shell.conf" 0644 root:root "# playr-agent-shell settings (written by agent-install.sh)
libvirt_uris = $libvirt_uri
pools = $pools
log_file = $LOG_DIR/commands.log
virsh = $virsh_path"

# 2. The system user: a login shell that can run the forced command, no password, group libvirt.
if ! id "$agent_user" >/dev/null 2>&1; then
    useradd --system --home-dir "$HOME_DIR" --create-home --shell /bin/sh --groups libvirt \
        --comment "PlayrServers portal agent" "$agent_user"
    say "created user $agent_user"
fi
recorded_user=$agent_user
write_state() {
    put_file "$CONFIG_DIR/agent.conf" 0644 root:root "# written by agent-install.sh; holds no secret
PORTAL_URL=$portal
AGENT_ID=$agent_id
AGENT_USER=$agent_user
CREATED_LIBEXEC=$created_libexec"
}
write_state  # from here on, --uninstall knows the user is ours
id -nG "$agent_user" | tr ' ' '\n' | grep -qx libvirt || usermod -aG libvirt "$agent_user"
# useradd leaves the account locked ("!"), which sshd refuses when UsePAM is off; "*" only
# means "no password" and key logins work.
[ "$(getent shadow "$agent_user" | cut -d: -f2)" = "*" ] || usermod -p '*' "$agent_user"
install -d -m 0750 -o "$agent_user" -g "$agent_user" "$LOG_DIR"
# The key file belongs to root: the account cannot change which keys log into it.
install -d -m 0755 -o root -g root "$HOME_DIR/.ssh"

# 3. The agent in the portal: the one recorded here if the portal still has it, else a new one.
if [ -n "$agent_id" ]; then
    answer=$(portal_call GET "/agents/$agent_id")
    status=$(head -n 1 <<<"$answer")
    case "$status" in
        200)
            pinned=$(tail -n +2 <<<"$answer" | json_field host_key)
            login=$(tail -n +2 <<<"$answer" | json_field username)
            if [ "$pinned" != "$host_key" ] || [ "$login" != "$agent_user" ]; then
                say "agent $agent_id in the portal is not this host: it pins host key '$pinned' and logs in as"
                say "'$login'; here the host key is '$host_key' ($host_key_file) and the user $agent_user."
                die "if this host's key really changed: PATCH /agents/$agent_id {\"host_key\": \"$host_key\"}, then run this again"
            fi ;;
        404) say "agent $agent_id is no longer in the portal (or not yours); registering again"; agent_id="" ;;
        *) die "cannot read agent $agent_id from the portal: $(tail -n +2 <<<"$answer" | problem_text)" ;;
    esac
fi
if [ -z "$agent_id" ]; then
    body=$(NAME="$name" ADDRESS="$address" PORT="$ssh_port" AGENT_USER="$agent_user" URI="$libvirt_uri" \
        HOST_KEY="$host_key" python3 -c 'import json, os
print(json.dumps({"name": os.environ["NAME"], "hostname": os.environ["ADDRESS"], "port": int(os.environ["PORT"]),
                  "username": os.environ["AGENT_USER"], "libvirt_uri": os.environ["URI"],
                  "host_key": os.environ["HOST_KEY"], "generate_key": True}))')
    answer=$(portal_call POST /agents "$body")
    status=$(head -n 1 <<<"$answer")
    [ "$status" = 201 ] || die "the portal refused the registration ($status): $(tail -n +2 <<<"$answer" | problem_text)"
    agent_id=$(tail -n +2 <<<"$answer" | json_field id)
    [[ "$agent_id" =~ ^[0-9]+$ ]] || die "the portal answered the registration without an agent id"
    say "registered agent $agent_id ($name at $address:$ssh_port) with host key $host_key_file"
fi
write_state

# 4. The portal's public key, forced through the restricted shell. ``pty``: the serial console
#    (issue 17) needs a terminal; the shell refuses every other command that gets one.
answer=$(portal_call GET "/agents/$agent_id/public-key")
[ "$(head -n 1 <<<"$answer")" = 200 ] || die "cannot read the agent's public key: $(tail -n +2 <<<"$answer" | problem_text)"
public_key=$(tail -n +2 <<<"$answer" | json_field public_key)
[[ "$public_key" =~ ^(ssh|ecdsa|sk)-[A-Za-z0-9@.-]+\ [A-Za-z0-9+/=]+$ ]] || die "the portal answered an unexpected public key"
put_file "$HOME_DIR/.ssh/authorized_keys" 0644 root:root \
    "restrict,pty,command=\"$SHELL_PATH\" $public_key playr-portal-agent-$agent_id"

say "enrolled as agent $agent_id: the portal will log in as $agent_user@$address:$ssh_port"
say "confirm from the portal side with POST /agents/$agent_id/check (authenticated, libvirt_reachable)"
echo "AGENT_ID=$agent_id"
