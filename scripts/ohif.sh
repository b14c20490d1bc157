#!/usr/bin/env bash
# Install OHIF Viewer's prebuilt app (npm package @ohif/app, its dist/ folder) into a cache
# folder, for tests/dicomweb/test_ohif_browser.py and for trying OHIF against a local
# studybridge by hand. Prints the dist folder (index.html, app-config.js, bundles).
#
# Usage: scripts/ohif.sh [--deps]
#   --deps   also install what the browser test needs: Debian's chromium and CJK fonts
#            (apt-get) and Playwright's Python package (pip). No browser is downloaded
#            by Playwright: the test drives /usr/bin/chromium.
# Environment:
#   OHIF_VERSION               @ohif/app version (default below; keep it equal to
#                              OHIF_VERSION in tests/dicomweb/test_ohif_browser.py)
#   STUDYBRIDGE_OHIF_CACHE     cache root (default ~/.cache/studybridge/ohif)
#
# Only the package tarball is fetched (npm pack, ~48 MiB, ~205 MB unpacked): dist/ is
# self-contained, so none of @ohif/app's npm dependencies are installed.
set -euo pipefail

OHIF_VERSION="${OHIF_VERSION:-3.13.2}"
CACHE="${STUDYBRIDGE_OHIF_CACHE:-$HOME/.cache/studybridge/ohif}"
DEST="$CACHE/$OHIF_VERSION"

if [ "${1:-}" = "--deps" ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if [ ! -x /usr/bin/chromium ]; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium fonts-noto-cjk >/dev/null
  fi
  python3 -c "import playwright" 2>/dev/null ||
    python3 -m pip install -q --disable-pip-version-check playwright
fi

if [ -f "$DEST/dist/index.html" ] && [ -f "$DEST/dist/app-config.js" ]; then
  echo "$DEST/dist"
  exit 0
fi

command -v npm >/dev/null || { echo "npm is not installed (apt-get install npm)" >&2; exit 1; }
mkdir -p "$CACHE"
work="$(mktemp -d "$CACHE/.download.XXXXXX")"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent --no-fund --no-audit "@ohif/app@$OHIF_VERSION" >/dev/null)
tarball="$(ls "$work"/ohif-app-*.tgz)"
mkdir -p "$work/unpacked"
tar -xzf "$tarball" -C "$work/unpacked" --strip-components=1
[ -f "$work/unpacked/dist/index.html" ] || {
  echo "@ohif/app@$OHIF_VERSION has no dist/index.html" >&2
  exit 1
}
rm -rf "$DEST"
mv "$work/unpacked" "$DEST"
echo "$DEST/dist"
