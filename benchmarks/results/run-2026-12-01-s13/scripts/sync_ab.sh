# torch.cuda.synchronize() beside 200k msg/s, 1 ms leases: lease launches by graph vs as before, interleaved.
for sw in ${SWITCHES:-5 0.2}; do
for r in 1 2 3; do
  for l in ${LAUNCHES:-graph call graph-current}; do
    timeout 60 python3 tests/neighbour_child.py torch busy --lease-ms 1 --sync-samples 300 --rate 200000 --switch-interval-ms $sw --launch $l > /tmp/sync.json 2>/tmp/sync_err.txt || { echo "child failed ($l, round $r)"; tail -5 /tmp/sync_err.txt; }
    python3 -c "
import json,sys,numpy as np
lines=[json.loads(x) for x in open('/tmp/sync.json') if x.startswith('{')]
w=np.asarray(next(x['sync_ms'] for x in lines if 'sync_ms' in x)); s=next((x['summary'] for x in lines if 'summary' in x),{})
print('switch $sw ms round $r $l: sync p50 %.2f p99 %.2f max %.2f ms; msg/s %s lost %s wrong %s launches %s' % (np.percentile(w,50),np.percentile(w,99),w.max(),round(s.get('msg_per_s',0)),s.get('lost'),s.get('wrong'),s.get('launches')))
"
  done
done
done
