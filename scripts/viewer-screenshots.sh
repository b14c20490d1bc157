#!/usr/bin/env bash
# Regenerate the screenshots in docs/images/ from the browser tests (synthetic data):
# runs the viewer and share-link tests in headless Chromium with
# STUDYBRIDGE_VIEWER_SHOTS set, then copies the main screens, named viewer-*.png.
set -euo pipefail
cd "$(dirname "$0")/.."
shots="$(mktemp -d)"
trap 'rm -rf "$shots"' EXIT
STUDYBRIDGE_VIEWER_SHOTS="$shots" PYTHONPATH="$PWD" python -m pytest -p no:cacheprovider -q \
  tests/viewer/test_viewer_browser.py tests/viewer/test_share_browser.py
for name in study-ct-measure study-ct-korean study-jpeg-lossy report-sr phone state-arriving \
            share-code share-wrong-code share-viewer share-revoked-viewer \
            share-code-korean-phone share-download; do
  cp "$shots/$name.png" "docs/images/viewer-$name.png"
done
echo "screenshots copied to docs/images/"
