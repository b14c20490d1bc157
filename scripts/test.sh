#!/usr/bin/env bash
# Install everything the test suite needs (Debian, Python and npm packages), then run it.
# Usage: scripts/test.sh [pytest args...]   e.g. scripts/test.sh -m "fast and not postgres"
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: dcmtk (real DICOM peers), chromium and CJK fonts (browser tests).
need_apt=()
[ -x /usr/bin/storescu ] && [ -x /usr/bin/movescu ] && [ -x /usr/bin/storescp ] || need_apt+=(dcmtk)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
dpkg -s fonts-noto-cjk >/dev/null 2>&1 || need_apt+=(fonts-noto-cjk)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
# OHIF's prebuilt viewer (npm package tarball) for the browser tests.
bash scripts/ohif.sh >/dev/null
# node-oidc-provider (npm package) for the OpenID Connect sign-in tests.
bash scripts/oidc-provider.sh >/dev/null

ruff check gateway dicomweb viewer consent tests bench
ruff format --check gateway dicomweb viewer consent tests bench
python3 -m pytest "$@"
