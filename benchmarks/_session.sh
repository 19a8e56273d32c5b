# Sourced by gpu_session.sh (and its tests): run timed steps inside one budget of seconds.
# The caller sets: out (the folder that comes back), work (scratch, each step's JSON), budget
# (seconds for the whole session, counted by bash's SECONDS) and status (0; 1 once a step
# fails or is skipped).

step() {  # step NAME SECONDS COMMAND...: run within the limit and the budget, log, remember
    local name=$1 limit=$2
    shift 2
    local left=$((budget - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: skipped, ${left}s of the ${budget}s budget left" | tee -a "$out/log.txt"
        status=1
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "=== $name (limit ${limit}s): $*" | tee -a "$out/log.txt"
    local start=$SECONDS
    # SIGTERM at the limit (the package stops between steps on it), SIGKILL 10 s later.
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$out/log.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/log.txt"
    [ "$rc" -eq 0 ] || status=1
    merge
}

merge() {  # every JSON under $work into $out/results.json, keyed by its path under $work
    python - "$work" "$out/results.json" <<'PY'
import json, sys
from pathlib import Path
merged = {}
for f in sorted(Path(sys.argv[1]).rglob("*.json")):
    try:
        merged[str(f.relative_to(sys.argv[1]))] = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        merged[str(f.relative_to(sys.argv[1]))] = {"unreadable": str(e)}
Path(sys.argv[2]).write_text(json.dumps(merged, indent=2) + "\n")
PY
}
