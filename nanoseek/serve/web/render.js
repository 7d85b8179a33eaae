// Markdown with code highlighting and LaTeX math, rendered safely: math is cut out before Markdown sees it
// (Markdown would eat its backslashes and underscores), typeset by KaTeX, put back, and the whole HTML goes
// through DOMPurify (no images, forms or styles) before it reaches the page. Code blocks are highlighted after sanitizing (highlight.js
// only adds spans with classes).
"use strict";

const MATH = /\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\]|\\\(([\s\S]+?)\\\)|\$([^\s$](?:[^$\n]*?[^\s$])?)\$/g;
const FENCE = /(```[\s\S]*?(?:```|$)|`[^`\n]+`)/g;

function typeset(tex, display) {
  try {
    return katex.renderToString(tex, { displayMode: display, throwOnError: false, output: "htmlAndMathml" });
  } catch (e) {
    return null;
  }
}

// Math outside code: replaced by placeholders that Markdown leaves alone.
function extractMath(text) {
  const pieces = [];
  const parts = text.split(FENCE);
  const out = parts.map((part, i) => {
    if (i % 2 === 1) return part; // code: untouched
    return part.replace(MATH, (whole, d1, d2, i1, i2) => {
      const display = d1 !== undefined || d2 !== undefined;
      const html = typeset(d1 ?? d2 ?? i1 ?? i2, display);
      if (html === null) return whole;
      pieces.push(html);
      return `@@MATH${pieces.length - 1}@@`;
    });
  });
  return [out.join(""), pieces];
}

function renderMarkdown(text) {
  const [protectedText, math] = extractMath(text || "");
  let html = marked.parse(protectedText, { gfm: true, breaks: true });
  html = html.replace(/@@MATH(\d+)@@/g, (_, i) => math[Number(i)]);
  // No images: a reply could otherwise make the browser fetch any URL (markdown-image data exfiltration).
  const clean = DOMPurify.sanitize(html, { USE_PROFILES: { html: true, mathMl: true, svg: true },
                                          FORBID_TAGS: ["img", "image", "style", "form", "input", "button"] });
  const box = document.createElement("div");
  box.innerHTML = clean;
  for (const code of box.querySelectorAll("pre code")) hljs.highlightElement(code);
  for (const a of box.querySelectorAll("a")) { a.target = "_blank"; a.rel = "noopener noreferrer"; }
  return box.innerHTML;
}

window.renderMarkdown = renderMarkdown;
