#!/bin/sh
# The container smoke test (deploy/smoke.py): build, `compose up`, one task through the API, `compose down -v`.
exec python3 "$(dirname "$0")/smoke.py" "$@"
