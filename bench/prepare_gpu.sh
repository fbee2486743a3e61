#!/usr/bin/env bash
# Everything a GPU lease needs from this machine, made once before it (the device reaches no network):
#   .whl/                 wheels the GPU image (Python 3.12) lacks for the host: torchsde, trampoline, PyAV
#   .whl/ref/             the reference environment's pins (scripts/setup_reference.sh) for bench/gpu.sh --reference
#   .cache/ComfyUI-slim/  the host without the tokenizers of other model families (17 MB an SD1.5 run never reads)
# Then: run(command="bash bench/gpu.sh [--reference]", carry=[".cache/ComfyUI-slim", ".whl"], timeout_s=590)
# The device tool carries at most 64 MiB with the tree; the total is printed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"
}
download .whl torchsde trampoline av
# shellcheck disable=SC2046  # one word per pin
download .whl/ref $(grep -oE '(diffusers|transformers|huggingface-hub|tokenizers)==[0-9.]+' scripts/setup_reference.sh)
src=.cache/ComfyUI slim=.cache/ComfyUI-slim
[ -d "$src/comfy" ] || { echo "no host at $src: run bash scripts/setup_host.sh first" >&2; exit 1; }
rm -rf "$slim"
cp -a "$src" "$slim"
find "$slim" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$slim"/.git "$slim"/comfy/text_encoders/*_tokenizer
echo "carry: $(du -cb "$slim" .whl | tail -1 | cut -f1) bytes + the tree $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)" \
     "(limit $((64 * 1024 * 1024)))"
