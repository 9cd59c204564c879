#!/usr/bin/env bash
# Set up a node (Ubuntu/Debian, run as root from a checkout): user, venv, units, env files.
#   sudo deploy/install.sh ps        # the parameter server node
#   sudo deploy/install.sh worker    # a worker node
set -euo pipefail
ROLE="${1:?usage: install.sh ps|worker}"
SRC="$(cd "$(dirname "$0")/.." && pwd)"
id freezeps >/dev/null 2>&1 || useradd --system --home /var/lib/freezeps --shell /usr/sbin/nologin freezeps
install -d -o freezeps -g freezeps /var/lib/freezeps /etc/freezeps
if [[ "$SRC" != /opt/freezeps ]]; then rm -rf /opt/freezeps && cp -r "$SRC" /opt/freezeps; fi
apt-get install -y python3-venv dataset-fashion-mnist
(cd /opt/freezeps && scripts/setup.sh)
install -m 0644 /opt/freezeps/deploy/freezeps-ps.service /opt/freezeps/deploy/freezeps-worker@.service /etc/systemd/system/
[[ -f /etc/freezeps/$ROLE.env ]] || install -m 0640 -g freezeps "/opt/freezeps/deploy/$ROLE.env" /etc/freezeps/
systemctl daemon-reload
echo "installed; edit /etc/freezeps/$ROLE.env, then:"
if [[ "$ROLE" == ps ]]; then echo "  systemctl start freezeps-ps"; else echo "  systemctl start freezeps-worker@0"; fi
