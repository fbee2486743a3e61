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

# The newest ComfyUI frontend on the package index as of this pin (users upgrade the frontend far
# more often than the host): unpacked into .cache/, served with the host's --front-end-root by the
# browser test. The host's own pinned frontend (1.32.x) comes with the host.
NEWEST_FRONTEND="${BLIP_NEWEST_FRONTEND:-1.58.1}"
frontend_dir="$root/.cache/frontend-$NEWEST_FRONTEND"
if [ ! -f "$frontend_dir/comfyui_frontend_package/static/index.html" ]; then
    echo "setup_browser: comfyui-frontend-package==$NEWEST_FRONTEND into $frontend_dir" >&2
    rm -rf "$frontend_dir.tmp"
    "$root/.cache/host-venv/bin/python" -m pip install -q --no-deps --target "$frontend_dir.tmp" \
        "comfyui-frontend-package==$NEWEST_FRONTEND"
    rm -rf "$frontend_dir" && mv "$frontend_dir.tmp" "$frontend_dir"
fi
