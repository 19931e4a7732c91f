summ() { python3 -c "
import sys,json
for line in sys.stdin:
    try: r=json.loads(line)
    except Exception: print(line.rstrip()[:200]); continue
    e=r.get('rel_err_vs_ab') or {}
    print('   ', r['stack'], r['variant'], r.get('device_us'), r.get('error','')[:100], r.get('parity',''), ('%.1e' % max(e.values())) if e else '', [k for k in (r.get('kernels') or [])][:3])
"; }
timeout 150 python3 -m pytest -m gpu -q -n 4 tests/test_fused_small_backward.py 2>&1 | tail -4
probe() { echo "== $1 $2"; timeout 100 python3 bench/small_backward_probe.py $OUT/p_$(echo $1 | tr ',' '_')_$2.json --spec $1 --stacks $2 --variants ab,on_chip 2>&1 | grep -v Warn | summ; }
probe 32x9,relu,0,float16 jax
probe 64x3,swiglu,1,float16 jax
probe 64x4,swiglu,1,float16 torch,jax
probe 32x6,swiglu,1,float16 torch,jax
probe 32x6,gelu_tanh,1,float16 jax
probe 16x9,swiglu,1,float16 torch
echo "== 128x9 ab"; timeout 100 python3 bench/small_backward_probe.py $OUT/p_128x9.json --spec 128x9,relu,0,float16 --stacks torch,jax --variants ab 2>&1 | grep -v Warn | summ
