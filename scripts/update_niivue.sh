#!/usr/bin/env bash
# Replace the vendored NiiVue bundle with another npm release: scripts/update_niivue.sh 0.69.0
# Needs npm and the npm registry; the app itself never fetches it.
set -euo pipefail
version="${1:?usage: scripts/update_niivue.sh VERSION}"
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@niivue/niivue@${version}" >/dev/null && tar xzf niivue-niivue-*.tgz)
cp "$work/package/dist/niivue.umd.js" "$root/ich/viewer/frontend/vendor/niivue.umd.js"
echo "niivue ${version}: sha256 $(sha256sum "$root/ich/viewer/frontend/vendor/niivue.umd.js" | cut -d' ' -f1)"
echo "Update ich/viewer/frontend/vendor/README.md with this version and hash, then run the browser test."
