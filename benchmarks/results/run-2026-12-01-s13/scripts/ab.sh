# A/B of the kernel source: new (working tree) vs old (.scratch/s13/gpuq_queue_old.cu), interleaved.
set -u
mkdir -p /tmp/old && cp -r gpuq_driver device_src benchmarks /tmp/old/ && cp .scratch/s13/gpuq_queue_old.cu /tmp/old/device_src/gpuq_queue.cu
export GPUQ_CACHE_DIR=/tmp/cubins
ROUNDS=${ROUNDS:-2}
for r in $(seq $ROUNDS); do
  for v in new old; do
    if [ $v = new ]; then D=$PWD; else D=/tmp/old; fi
    echo "=== round $r: $v"
    (cd $D && PYTHONPATH=/tmp/site:$D timeout 120 python3 benchmarks/probe_tail.py --iters ${ITERS:-20000} --leases ${LEASES:-1} 2>&1)
  done
done
