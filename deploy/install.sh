#!/usr/bin/env bash
# Set up a node (Ubuntu/Debian, as root, from a checkout): user, venv, units, settings, secrets.
#   sudo deploy/install.sh ps     SECRETS   # the parameter server node
#   sudo deploy/install.sh worker SECRETS   # a worker node
# SECRETS is a folder made by `freezeps certs` (see deploy/README.md); the files this role needs
# are copied to /etc/freezeps, readable by root and the freezeps group only. Run again to update;
# existing /etc/freezeps/*.env files are kept.
set -euo pipefail
ROLE="${1:?usage: install.sh ps|worker SECRETS}"
SECRETS="${2:?usage: install.sh ps|worker SECRETS (a folder made by freezeps certs)}"
case "$ROLE" in
    ps) FILES=(ca.pem ps.pem ps.key token) ;;
    worker) FILES=(ca.pem worker.pem worker.key token) ;;
    *) echo "install.sh: role must be ps or worker, not $ROLE" >&2; exit 2 ;;
esac
for f in "${FILES[@]}"; do
    [[ -f "$SECRETS/$f" ]] || { echo "install.sh: $SECRETS/$f is missing (make it with freezeps certs)" >&2; exit 2; }
done
SRC="$(cd "$(dirname "$0")/.." && pwd)"

id freezeps >/dev/null 2>&1 || useradd --system --home /var/lib/freezeps --shell /usr/sbin/nologin freezeps
apt-get install -y python3-venv dataset-fashion-mnist
if [[ "$SRC" != /opt/freezeps ]]; then rm -rf /opt/freezeps && cp -r "$SRC" /opt/freezeps; fi
(cd /opt/freezeps && scripts/setup.sh)

install -d -m 0750 -o root -g freezeps /etc/freezeps
for f in "${FILES[@]}"; do
    install -m 0640 -o root -g freezeps "$SECRETS/$f" /etc/freezeps/
done
[[ -f /etc/freezeps/$ROLE.env ]] || install -m 0640 -o root -g freezeps "/opt/freezeps/deploy/$ROLE.env" /etc/freezeps/

install -m 0644 /opt/freezeps/deploy/freezeps-ps.service /opt/freezeps/deploy/freezeps-worker@.service \
    /etc/systemd/system/
# Growing restart delays need systemd 254 (RestartSteps); older ones restart every 5 s.
if (( $(systemctl --version | awk 'NR == 1 {print $2}') >= 254 )); then
    for unit in freezeps-ps.service freezeps-worker@.service; do
        install -D -m 0644 /opt/freezeps/deploy/10-backoff.conf "/etc/systemd/system/$unit.d/10-backoff.conf"
    done
fi
systemctl daemon-reload
echo "installed; check /etc/freezeps/$ROLE.env, then:"
if [[ "$ROLE" == ps ]]; then echo "  systemctl start freezeps-ps"; else echo "  systemctl start freezeps-worker@0"; fi
