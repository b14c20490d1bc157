#!/usr/bin/env bash
# Install everything the test suite needs (Debian and Python packages), then run it.
# Usage: scripts/test.sh [pytest args...]   e.g. scripts/test.sh -m fast
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for tool in storescu findscu movescu getscu storescp echoscu; do
  [ -x "/usr/bin/$tool" ] || { need_apt+=(dcmtk); break; }
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  fi
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
ruff check gateway dicomweb tests bench
ruff format --check gateway dicomweb tests bench
python3 -m pytest "$@"
