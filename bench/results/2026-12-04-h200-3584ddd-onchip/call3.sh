for hx in "" evict_first; do for hy in "" evict_first; do
  FUSEDMLP_XHINT=$hx FUSEDMLP_YHINT=$hy timeout 140 python3 vartmp/hint.py 2>&1 | grep -v -i warn | tail -4
done; done
