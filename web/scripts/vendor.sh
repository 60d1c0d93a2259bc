#!/bin/sh
# Copies the pinned libraries (web/package.json + package-lock.json) from node_modules into
# web/vendor/, with their licenses. web/vendor/ is committed: running the dashboard needs no npm.
# Run from anywhere:  sh web/scripts/vendor.sh   (or `npm run vendor` in web/)
set -eu
cd "$(dirname "$0")/.."
npm ci --no-audit --no-fund
rm -rf vendor
mkdir -p vendor
nm=node_modules
# Preact and its hooks. The hooks import the bare name "preact"; the browser has no import map
# (an inline one would need a CSP exception), so the import is rewritten to the sibling file.
sed '/^\/\/# sourceMappingURL=/d' $nm/preact/dist/preact.mjs > vendor/preact.mjs
sed -e 's#from *"preact"#from"./preact.mjs"#g' -e '/^\/\/# sourceMappingURL=/d' \
  $nm/preact/hooks/dist/hooks.mjs > vendor/preact-hooks.mjs
grep -q 'from"./preact.mjs"' vendor/preact-hooks.mjs || { echo "vendor.sh: preact hooks import not rewritten" >&2; exit 1; }
cp $nm/preact/LICENSE vendor/LICENSE-preact
# htm: tagged templates instead of JSX, so no build step.
cp $nm/htm/dist/htm.mjs vendor/htm.mjs
cp $nm/htm/LICENSE vendor/LICENSE-htm
# uPlot: time-series charts (ESM build and its stylesheet).
cp $nm/uplot/dist/uPlot.esm.js vendor/uplot.mjs
cp $nm/uplot/dist/uPlot.min.css vendor/uplot.css
cp $nm/uplot/LICENSE vendor/LICENSE-uplot
# Versions, for humans reading vendor/.
node -e '
const l = require("./package-lock.json").packages;
for (const p of ["preact", "htm", "uplot"]) console.log(p + " " + l["node_modules/" + p].version);
' > vendor/VERSIONS
echo "vendored: $(tr '\n' ' ' < vendor/VERSIONS)"
