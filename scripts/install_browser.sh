#!/usr/bin/env bash
# Headless Chromium + chromedriver from Debian's packages, for the review page's browser test.
# No-op when both are present; as non-root without them, say how to get them and go on
# (the browser test then skips locally; under CI=true it fails instead).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
else
  echo "note: chromium/chromedriver missing; install them (apt-get install chromium chromium-driver)" \
       "to run the review page's browser test" >&2
fi
