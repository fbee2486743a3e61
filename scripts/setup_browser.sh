#!/usr/bin/env bash
# Provision the browser test (tests/test_frontend.py): Debian's Chromium at /usr/bin/chromium
# (and node/npm if absent) from apt, and playwright-core, the driver library only, from
# tests/browser/package-lock.json into tests/browser/node_modules. Idempotent: quick once done.
# Playwright never downloads a browser of its own; the test points it at /usr/bin/chromium.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 DEBIAN_FRONTEND=noninteractive

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

packages=()
[ -x /usr/bin/chromium ] || packages+=(chromium)
command -v node >/dev/null 2>&1 || packages+=(nodejs)
command -v npm >/dev/null 2>&1 || packages+=(npm)
if [ "${#packages[@]}" -gt 0 ]; then
    echo "setup_browser: apt-get install ${packages[*]}" >&2
    as_root apt-get update -qq
    as_root apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
node -e 'process.exit(+process.versions.node.split(".")[0] >= 18 ? 0 : 1)' \
    || { echo "setup_browser: node $(node --version) is too old, playwright-core needs 18 or later" >&2; exit 1; }

cd "$root/tests/browser"
if [ ! -f node_modules/playwright-core/package.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    echo "setup_browser: npm ci (playwright-core)" >&2
    npm ci --no-audit --no-fund --loglevel=error
fi
