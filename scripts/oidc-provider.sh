#!/usr/bin/env bash
# Install node-oidc-provider (npm package oidc-provider) into a cache folder, for the
# OpenID Connect sign-in tests (tests/dicomweb/test_oidc.py start it with
# tests/dicomweb/oidc-provider.mjs on 127.0.0.1). Prints the folder holding node_modules.
#
# Environment:
#   OIDC_PROVIDER_VERSION          oidc-provider version (default below)
#   STUDYBRIDGE_OIDC_PROVIDER_CACHE  cache root (default ~/.cache/studybridge/oidc-provider)
set -euo pipefail

VERSION="${OIDC_PROVIDER_VERSION:-9.13.3}"
CACHE="${STUDYBRIDGE_OIDC_PROVIDER_CACHE:-$HOME/.cache/studybridge/oidc-provider}"
DEST="$CACHE/$VERSION"

if [ -f "$DEST/node_modules/oidc-provider/package.json" ]; then
  echo "$DEST"
  exit 0
fi

command -v npm >/dev/null || { echo "npm is not installed (apt-get install npm)" >&2; exit 1; }
mkdir -p "$CACHE"
work="$(mktemp -d "$CACHE/.install.XXXXXX")"
trap 'rm -rf "$work"' EXIT
(cd "$work" && echo '{"private": true}' > package.json &&
  npm install --silent --no-fund --no-audit --no-package-lock "oidc-provider@$VERSION" >/dev/null)
rm -rf "$DEST"
mv "$work" "$DEST"
trap - EXIT
echo "$DEST"
