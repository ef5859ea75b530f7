#!/usr/bin/env bash
# The README's test command (via `make test`): system services the tests need, then pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
# pytest exits 5 when nothing was collected: that is a failure for CI, not a pass.
exit $status
