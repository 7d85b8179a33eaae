#!/usr/bin/env bash
# The chat page's front-end libraries, fetched from the npm registry at pinned versions; their built files and
# licenses are copied into nanoseek/serve/web/vendor/ and committed, so the page works offline, with no CDN and
# no build step for users. Run this only to change a version (then commit the result).
set -euo pipefail
MARKED=18.3.0      # Markdown
DOMPURIFY=3.5.0    # HTML sanitizer: every rendered reply goes through it
HLJS=11.12.0       # code highlighting (@highlightjs/cdn-assets: the prebuilt bundle of common languages)
KATEX=0.19.1       # LaTeX math (R1 answers in \boxed{})

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/nanoseek/serve/web/vendor"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
npm pack --silent "marked@$MARKED" "dompurify@$DOMPURIFY" "@highlightjs/cdn-assets@$HLJS" "katex@$KATEX" >/dev/null
for f in *.tgz; do mkdir "${f%.tgz}"; tar -xzf "$f" -C "${f%.tgz}"; done
rm -rf "$out"
mkdir -p "$out/fonts" "$out/licenses"
cp "marked-$MARKED/package/lib/marked.umd.js" "$out/"
cp "dompurify-$DOMPURIFY/package/dist/purify.min.js" "$out/"
cp "highlightjs-cdn-assets-$HLJS/package/highlight.min.js" "$out/"
cp "highlightjs-cdn-assets-$HLJS/package/styles/github.min.css" "$out/hljs-light.min.css"
cp "highlightjs-cdn-assets-$HLJS/package/styles/github-dark.min.css" "$out/hljs-dark.min.css"
cp "katex-$KATEX/package/dist/katex.min.js" "katex-$KATEX/package/dist/katex.min.css" "$out/"
cp "katex-$KATEX/package/dist/fonts/"*.woff2 "$out/fonts/"
cp "marked-$MARKED/package/LICENSE" "$out/licenses/marked.LICENSE"
cp "dompurify-$DOMPURIFY/package/LICENSE" "$out/licenses/dompurify.LICENSE"
cp "highlightjs-cdn-assets-$HLJS/package/LICENSE" "$out/licenses/highlight.js.LICENSE"
cp "katex-$KATEX/package/LICENSE" "$out/licenses/katex.LICENSE"
cat > "$out/VERSIONS" <<VERSIONS
marked $MARKED
dompurify $DOMPURIFY
@highlightjs/cdn-assets $HLJS
katex $KATEX
VERSIONS
echo "vendored into $out: $(du -sh "$out" | cut -f1)"
