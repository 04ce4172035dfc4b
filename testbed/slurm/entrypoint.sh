#!/bin/sh
# Entry point of an rx-slurm container: `head` (slurmctld, slurmdbd + MariaDB, sshd: the login node) or
# `compute` (slurmd). No systemd: each daemon is started here; docker run --init reaps what they leave.
set -eu
role="${1:-compute}"

install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/munge
chown munge:munge /run/munge
su -s /bin/sh munge -c '/usr/sbin/munged --force'

if [ "$role" = compute ]; then
    exec /usr/sbin/slurmd -D -s
fi

# The login node: accounting first (slurmctld registers with slurmdbd when it starts).
install -d -o mysql -g mysql /run/mysqld
/usr/sbin/mariadbd --user=mysql --skip-networking=0 --bind-address=127.0.0.1 >/var/log/mariadb.log 2>&1 &
for _ in $(seq 100); do
    mariadb -e 'select 1' >/dev/null 2>&1 && break
    sleep 0.1
done
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
/usr/sbin/slurmdbd
for _ in $(seq 100); do
    sacctmgr -n list cluster >/dev/null 2>&1 && break
    sleep 0.1
done
sacctmgr -i add cluster rxcluster >/dev/null 2>&1 || true
/usr/sbin/slurmctld

# Then what every testbed host does: fresh host keys, the state dir's key for rx, sshd in the foreground.
exec /usr/local/bin/rx-testbed-entrypoint
