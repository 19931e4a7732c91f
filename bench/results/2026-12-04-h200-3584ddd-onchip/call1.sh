# call 1 of the eighteenth session: GPU tests of fused_small, the on-chip table re-derived, the 128-wide saving forward
summ() { python3 -c "
import sys,json
for line in sys.stdin:
    try: r=json.loads(line)
    except Exception: print(line.rstrip()[:200]); continue
    e=r.get('rel_err_vs_ab') or {}
    print('   ', r['stack'], r['variant'], r.get('device_us'), r.get('error','')[:120], r.get('parity',''), max(e.values()) if e else '', r.get('kernels'))
"; }
timeout 240 python3 -m pytest -m gpu -q -n 4 tests/test_fused_small_backward.py tests/test_fused_small.py 2>&1 | tail -6
for s in 16x9,relu,0,float16 16x9,gelu_tanh,1,float16 32x9,relu,0,float16 32x6,gelu_tanh,1,float16 64x6,gelu_tanh,1,float16 64x3,swiglu,1,float16; do
  echo "== $s"; timeout 80 python3 bench/small_backward_probe.py $OUT/p_$(echo $s | tr ',' '_').json --spec $s --stacks torch --variants ab,on_chip 2>&1 | summ
done
echo "== 128x9 saving"; timeout 80 python3 bench/small_backward_probe.py $OUT/p_128x9_saving.json --spec 128x9,relu,0,float16 --stacks torch,jax --variants ab 2>&1 | summ
