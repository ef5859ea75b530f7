#!/usr/bin/env bash
# The README's test command (via `make test`): system packages and services the tests need, then pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1

# A real SLURM with accounting (tests/test_slurm.py) and headless Chromium (tests/test_ui.py), from Debian.
SYSTEM_PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server chromium chromium-driver)
missing=()
for package in "${SYSTEM_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing Debian packages: ${missing[*]}; install them as root, or run the tests as root" >&2
    exit 1
  fi
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${SYSTEM_PACKAGES[@]}" >/dev/null
fi

# Tests start their services (SLURM daemons, MariaDB, an MLflow server) in folders under VIG_TEST_SERVICES and
# stop them by PID; whatever a failed or killed pytest leaves running is stopped here, by the PID files left.
VIG_TEST_SERVICES="$(mktemp -d -t vig-test-services.XXXXXX)"
export VIG_TEST_SERVICES
stop_services() {
  for folder in "$VIG_TEST_SERVICES"/*/; do
    if [[ -d $folder ]]; then .venv/bin/python tests/services/local_slurm.py stop "$folder" || true; fi
  done
  rm -rf "$VIG_TEST_SERVICES"
}
trap stop_services EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
# pytest exits 5 when nothing was collected: that is a failure for CI, not a pass.
exit $status
