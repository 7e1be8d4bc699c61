#!/usr/bin/env bash
# Re-vendors the web client's libraries from the npm registry (pinned versions), with their
# licences, into crates/opta-daemon/web/vendor/. The daemon embeds them; nothing is fetched at
# build or run time. Usage: scripts/vendor-web.sh  (then review and commit the diff)
set -euo pipefail
cd "$(dirname "$0")/.."
MARKED=18.2.1
DOMPURIFY=3.5.0
out=crates/opta-daemon/web/vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "marked@$MARKED" "dompurify@$DOMPURIFY" > /dev/null)
mkdir -p "$tmp/marked" "$tmp/dompurify"
tar xzf "$tmp/marked-$MARKED.tgz" -C "$tmp/marked"
tar xzf "$tmp/dompurify-$DOMPURIFY.tgz" -C "$tmp/dompurify"
# The source-map comments would point at files we do not ship.
grep -v '^//# sourceMappingURL=' "$tmp/marked/package/lib/marked.esm.js" > "$out/marked.js"
grep -v '^//# sourceMappingURL=' "$tmp/dompurify/package/dist/purify.es.mjs" > "$out/purify.js"
# Their type declarations, beside the modules, for the type check of the page (tsc in tests/browser).
cp "$tmp/marked/package/lib/marked.d.ts" "$out/marked.d.ts"
cp "$tmp/dompurify/package/dist/purify.es.d.mts" "$out/purify.d.ts"
cp "$tmp/marked/package/LICENSE" "$out/LICENSE-marked.txt"
cat "$tmp/dompurify/package/LICENSE" > "$out/LICENSE-dompurify.txt"
printf 'marked %s (npm, MIT)\ndompurify %s (npm, Apache-2.0 or MPL-2.0)\n' "$MARKED" "$DOMPURIFY" > "$out/VERSIONS"
echo "vendored marked $MARKED and dompurify $DOMPURIFY into $out"
