#!/usr/bin/env bash
# Set up everything freezeps needs on a fresh machine, idempotently:
#   - a virtual environment in .venv with the pinned packages (torch 2.14.1 and
#     torchvision 0.29.1 install from local files where the machine has them);
#   - the Fashion-MNIST files from Debian's dataset-fashion-mnist package, when apt can
#     install it (otherwise a clear message: tests do not need it, `freezeps run` does).
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
if [[ ! -f "$STAMP" || pyproject.toml -nt "$STAMP" ]]; then
    echo "setup: installing freezeps$EXTRAS and its pinned dependencies (first time: a few minutes)"
    .venv/bin/python -m pip install --quiet -e ".$EXTRAS"
    touch "$STAMP"
fi

FMNIST=/usr/share/datasets/fashion-mnist
if [[ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]]; then
    SUDO=""
    if [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null; then SUDO="sudo -n"; fi
    if command -v apt-get >/dev/null && { [[ "$(id -u)" == 0 ]] || [[ -n "$SUDO" ]]; }; then
        echo "setup: installing Debian's dataset-fashion-mnist"
        $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || {
            $SUDO apt-get update -qq >/dev/null 2>&1 || true
            $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || true
        }
    fi
    if [[ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]]; then
        echo "setup: Fashion-MNIST is not installed and could not be installed here."
        echo "       Install it with 'sudo apt-get install dataset-fashion-mnist', put the IDX files in"
        echo "       data/FashionMNIST/raw/, or run with --download where there is internet."
    fi
fi
