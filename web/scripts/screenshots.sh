#!/usr/bin/env bash
# Refreshes docs/screenshots/: runs the browser test (crates/mooring/tests/dashboard.rs), which
# fills a real server with 1,000 devices and a live agent, with SCREENSHOTS set, so every page is
# captured at desktop (1280x800) and phone (390x844) width, light and dark.
# Needs what the test needs: Node.js + npm, chromium (apt-get install -y chromium).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="$PWD/docs/screenshots"
mkdir -p "$out"
SCREENSHOTS="$out" cargo test -p mooring --test dashboard -- --nocapture
ls "$out"
