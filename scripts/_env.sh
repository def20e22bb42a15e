# Sourced by the run scripts: create (once) and reuse the project's environment in .venv/ in the checkout.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[lorkd] creating $VENV"
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.lorkd-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[lorkd] installing nnunetv2-lorkd and its dependencies into $VENV (first time: a few minutes)"
    FREE_GB="$(df -Pk "$VENV" | awk 'NR == 2 {printf "%d", $4 / 1048576}')"
    if [ "$FREE_GB" -lt 7 ]; then
        echo "[lorkd] warning: only ${FREE_GB} GB free where $VENV lives; the install needs about 7 GB" \
             "(torch's CUDA build). If it fails with 'No space left on device', free disk space and run again." >&2
    fi
    PIP=("$VENV/bin/python" -m pip)
    "${PIP[@]}" install --quiet --upgrade pip
    # Resolve once (metadata only), then install the resolved wheels in several pip calls, the large ones one per
    # call: one call would hold all ~3 GB of downloaded wheels on disk beside the installed ~6.5 GB.
    PLAN="$("${PIP[@]}" install --quiet --dry-run --report - -e "$ROOT[test]" \
            | "$VENV/bin/python" "$ROOT/scripts/_install_plan.py")"
    while read -r -a WHEELS; do
        [ "${#WHEELS[@]}" -eq 0 ] || "${PIP[@]}" install --quiet --no-deps "${WHEELS[@]}"
    done <<< "$PLAN"
    # The project itself, with pip's dependency check over everything installed above.
    "${PIP[@]}" install --quiet -e "$ROOT[test]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
