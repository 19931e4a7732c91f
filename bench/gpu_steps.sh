# The GPU scripts' common steps (bench/train_gpu.sh, bench/fp32_check.sh): sourced with $out set
# to the output folder. Makes it absolute, runs from the repository root with everything written
# to $out/log.txt as well, installs the project offline (the GPU image has its dependencies) and
# defines `run LIMIT CMD...`: CMD under `timeout LIMIT`, its time and exit status logged, any
# failure kept in $status for the script's own exit. $py: the Python to use ($PYTHON or python3).
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec > >(tee -a "$out/log.txt") 2>&1
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false COLUMNS=200
"$py" -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || true
status=0
run() {
  local t0=$SECONDS
  echo "== $*"
  timeout -k 10 "$@"
  local rc=$?
  echo "== exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -ne 0 ] && status=1
}
