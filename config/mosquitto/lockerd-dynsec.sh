#!/bin/sh
# Users and roles for lockerd banks in Mosquitto's dynamic security plugin (lockerd-dynsec.conf):
# the same access as the `acl` file beside this script, one role per bank.
#
#   lockerd-dynsec.sh init            the backend's role and user `backend`; deny by default
#   lockerd-dynsec.sh add-bank L1 [CLIENT_ID]
#                                     the role `bank-L1` and the user `L1` (the locker id),
#                                     who may only connect as CLIENT_ID (default lockerd-L1,
#                                     the daemon's default `[mqtt] client_id`)
#   lockerd-dynsec.sh remove-bank L1  delete both
#
# Connection options for mosquitto_ctrl come from CTRL_OPTS, for example
#   CTRL_OPTS="-h broker.example -p 8883 --cafile ca.pem -u admin" ./lockerd-dynsec.sh add-bank L1
# (mosquitto_ctrl asks for the admin's password unless CTRL_OPTS has -P; `init` also sends
# one command with mosquitto_pub, which takes the same options but never asks, so give -P).
# A new user's password is read from the file named by PASSWORD_FILE, else mosquitto_ctrl
# asks for it. It is then passed to mosquitto_ctrl as an argument, so run this where no one
# else can list processes.
#
# Why these rules: whoever may publish on a bank's `events/ack` can make it prune events the
# backend never stored (docs/broker.md). Only `backend` writes what banks read; a bank writes
# only its own outputs and reads only its own inputs, and may not write its own acks either.
set -eu

ctrl() {
    # CTRL_OPTS is split into words on purpose: it holds several options.
    # shellcheck disable=SC2086
    mosquitto_ctrl ${CTRL_OPTS:-} dynsec "$@"
}

# new_client USERNAME [-c CLIENT_ID]
new_client() {
    if [ -n "${PASSWORD_FILE:-}" ]; then
        ctrl createClient "$@" -p "$(head -n 1 "$PASSWORD_FILE")"
    else
        ctrl createClient "$@"
    fi
}

# The topics of the wire contract (docs/protocol.md, "MQTT"), under lockers/<locker id>/.
TO_BANK="keyring codes codes/manifest codes/part events/ack events/resend cmd help/reply"
FROM_BANK="sync/request events cmd/result state telemetry"

# allow ROLE TOPIC send|receive: publish (send) or subscribe to and be sent (receive) TOPIC.
allow() {
    if [ "$3" = send ]; then
        ctrl addRoleACL "$1" publishClientSend "$2" allow
    else
        ctrl addRoleACL "$1" subscribePattern "$2" allow
        ctrl addRoleACL "$1" publishClientReceive "$2" allow
    fi
}

locker_id_ok() {
    # The locker id rule of lockerd's configuration; `backend` is the backend's own user.
    case "$1" in
        backend|"") return 1 ;;
        *[!A-Za-z0-9_-]*) return 1 ;;
    esac
}

case "${1:-}" in
init)
    # Nothing is allowed that a role does not allow, receiving included. Sent as the
    # plugin's JSON command because `mosquitto_ctrl dynsec setDefaultACLAccess` has no effect
    # in Mosquitto 2.0.11 (Debian 12's).
    # shellcheck disable=SC2086
    mosquitto_pub ${CTRL_OPTS:-} -q 1 -t '$CONTROL/dynamic-security/v1' -m '{"commands":
        [{"command": "setDefaultACLAccess", "acls": [
          {"acltype": "publishClientSend", "allow": false},
          {"acltype": "publishClientReceive", "allow": false},
          {"acltype": "subscribe", "allow": false}]}]}'
    ctrl createRole backend
    for t in $TO_BANK; do allow backend "lockers/+/$t" send; done
    for t in $FROM_BANK; do allow backend "lockers/+/$t" receive; done
    new_client backend
    ctrl addClientRole backend backend
    ;;
add-bank)
    id="${2:-}"
    locker_id_ok "$id" || { echo "usage: $0 add-bank LOCKER_ID (letters, digits, _ and -; not 'backend')" >&2; exit 2; }
    ctrl createRole "bank-$id"
    for t in $TO_BANK; do allow "bank-$id" "lockers/$id/$t" receive; done
    for t in $FROM_BANK; do allow "bank-$id" "lockers/$id/$t" send; done
    # Tied to its client id, a bank's user cannot connect as another bank's client id, which
    # would take over that bank's session and drop what is queued for it.
    new_client "$id" -c "${3:-lockerd-$id}"
    ctrl addClientRole "$id" "bank-$id"
    ;;
remove-bank)
    id="${2:-}"
    locker_id_ok "$id" || { echo "usage: $0 remove-bank LOCKER_ID" >&2; exit 2; }
    ctrl deleteClient "$id"
    ctrl deleteRole "bank-$id"
    ;;
*)
    echo "usage: $0 init | add-bank LOCKER_ID [CLIENT_ID] | remove-bank LOCKER_ID" >&2
    exit 2
    ;;
esac
