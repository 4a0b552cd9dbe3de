nvidia-smi topo -m 2>&1 | head -8
lscpu | grep -i -E "numa|model name|^cpu\(s\)|socket|mhz" 
ls /sys/devices/system/node/ | grep node
for n in /sys/devices/system/node/node*; do echo "$n: $(cat $n/cpulist)"; done
BUS=$(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader | head -1 | tr 'A-F' 'a-f' | sed 's/^0000//; s/^/0000/')
echo "gpu $BUS numa_node $(cat /sys/bus/pci/devices/${BUS,,}/numa_node 2>/dev/null) local_cpulist $(cat /sys/bus/pci/devices/${BUS,,}/local_cpulist 2>/dev/null)"
run() { echo "=== $1"; shift; "$@" timeout 60 python3 benchmarks/probe_tail.py --iters 10000 --leases inf 2>&1 | grep -v "^   "; }
NODES=$(ls -d /sys/devices/system/node/node* | wc -l)
for r in 1 2; do
  run "default" env
  if [ "$NODES" -gt 1 ]; then
    for n in /sys/devices/system/node/node*; do run "taskset $(basename $n) $(cat $n/cpulist)" taskset -c $(cat $n/cpulist); done
  else
    run "taskset cpus 0-3" taskset -c 0-3
    run "taskset cpus 8-15" taskset -c 8-15
  fi
done
