#!/usr/bin/env bash
# Measure the small sweep and its long answers in alternating slices, so that both see the
# same machine (data/README.md, "The machine between the two sweeps"). Each slice is one
# `latkit profile --max-minutes M --resume` run; the journal in each output's logs/ carries
# the samples over, and each run goes on with its own seeded schedule where the last stopped.
#
#   bash data/interleave_sweeps.sh OUT_ROOT [SHORT_MIN] [LONG_MIN]
#
# SHORT_MIN:LONG_MIN (default 10:3.5) follows the two sweeps' lengths (about 41 and 13 minutes
# on a 2-vCPU EPYC), so that the long answers are spread over the whole short sweep. Slices
# are minutes long because every run warms up each configuration it meets once (an untimed
# sample): 3-minute slices made the short sweep 1.5x slower.
set -euo pipefail
out_root=${1:?usage: interleave_sweeps.sh OUT_ROOT [SHORT_MIN] [LONG_MIN]}
short_min=${2:-10}
long_min=${3:-3.5}
short_dir="$out_root/core_exp_small_cpu"
long_dir="$out_root/core_exp_small_cpu_long"
pin=(taskset -c 0 nice -n -10)
common=(--preset small --device cpu --threads 1 --repeats 2 --gzip)

status() {  # complete, or anything else while the sweep is unfinished
    python -c "import json,sys; print(json.load(open(sys.argv[1]))['status'])" \
        "$1/logs/run.json" 2>/dev/null || echo missing
}

slice=0
while [[ $(status "$short_dir") != complete || $(status "$long_dir") != complete ]]; do
    slice=$((slice + 1))
    if [[ $(status "$short_dir") != complete ]]; then
        echo "[$(date -u +%H:%M:%S)] slice $slice: short sweep, $short_min min"
        "${pin[@]}" latkit profile "${common[@]}" --output-dir "$short_dir" \
            --samples-per-config 3 --seed 0 --max-minutes "$short_min" --resume
    fi
    if [[ $(status "$long_dir") != complete ]]; then
        echo "[$(date -u +%H:%M:%S)] slice $slice: long answers, $long_min min"
        "${pin[@]}" latkit profile "${common[@]}" --output-dir "$long_dir" \
            --datasets coco_caption --top-k 4,8,12 --blocks 8,12,16 --samples-per-config 2 \
            --seed 1 --output-tokens 128-448 --max-minutes "$long_min" --resume
    fi
done
echo "[$(date -u +%H:%M:%S)] both sweeps complete"
