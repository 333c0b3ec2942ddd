#!/usr/bin/env bash
# System packages the test suite can use, installed only when missing (best effort: a machine without apt or
# without root still runs the suite, and tests/test_report.py then skips its rendering check).
#   - headless Chromium, for the report rendering test
set -uo pipefail
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    if command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo "ci/install.sh: could not install chromium; the report rendering test will be skipped" >&2
    else
        echo "ci/install.sh: no apt-get; install chromium yourself to run the report rendering test" >&2
    fi
fi
exit 0
