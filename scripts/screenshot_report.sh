#!/usr/bin/env bash
# Screenshot an int8eval report.html in headless Chromium (Debian's package), to look at it as a reader would.
#
#   apt-get update && apt-get install -y chromium        # once
#   scripts/screenshot_report.sh runs/lite0/report.html /tmp/report.png [1400,2000]
#
# The flags keep Chromium from reaching the network (the report needs nothing from it: every figure is an embedded
# PNG) and from touching a real profile. Open the PNG with any image viewer.
set -euo pipefail
html=${1:?usage: screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]}
out=${2:?usage: screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]}
size=${3:-1400,2000}
browser=$(command -v chromium || command -v chromium-browser || true)
if [[ -z $browser ]]; then
  echo "chromium not found: apt-get update && apt-get install -y chromium" >&2
  exit 1
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --screenshot="$(realpath -m "$out")" --window-size="$size" "file://$(realpath "$html")" 2>/dev/null
test -s "$out"
echo "$out"
