#!/usr/bin/env bash
# The developer loop, in an existing .venv (make it with the README's test command, or ci/install.sh +
# .ci/run): the generated docs must be current, then pytest on the given tests (default: all of them).
#   ci/test.sh                              # generated-docs checks + the whole suite
#   ci/test.sh tests/test_settings.py -x    # checks + one file
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python docs/_gen_settings.py --check
python docs/_gen_outputs.py --check
python -m pytest -q -p no:cacheprovider "$@"
