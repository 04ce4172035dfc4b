#!/bin/sh
# Entry point of an rx-testbed container: fresh host keys, the user's key, then sshd in the foreground.
set -eu

# Every container gets host keys of its own, made now: a key baked into the image would be shared by all.
rm -f /etc/ssh/ssh_host_*
ssh-keygen -A >/dev/null

# The testbed passes the public key of its state dir; without one nobody can log in, which is allowed.
if [ -n "${RX_AUTHORIZED_KEY:-}" ]; then
    install -d -m 700 -o rx -g rx /home/rx/.ssh
    printf '%s\n' "$RX_AUTHORIZED_KEY" > /home/rx/.ssh/authorized_keys
    chown rx:rx /home/rx/.ssh/authorized_keys
    chmod 600 /home/rx/.ssh/authorized_keys
fi
unset RX_AUTHORIZED_KEY

mkdir -p /run/sshd
chmod 755 /run/sshd
exec /usr/sbin/sshd -D -e
