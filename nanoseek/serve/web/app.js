// nanoseek web chat: streams /v1/chat/completions, shows reasoning_content in a collapsible panel,
// renders markdown, keeps the conversation in localStorage. No build step, no dependencies.
"use strict";
const $ = (id) => document.getElementById(id);
const STORE = "nanoseek-chat";
let history = JSON.parse(localStorage.getItem(STORE) || "[]");
let controller = null;

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// A small markdown renderer: fenced code, inline code, bold, italics, headings, lists, paragraphs.
function renderMarkdown(text) {
  const parts = text.split(/```(\w*)\n?([\s\S]*?)(?:```|$)/g);
  let html = "";
  for (let i = 0; i < parts.length; i += 3) {
    html += renderBlocks(parts[i]);
    if (i + 2 < parts.length) html += `<pre><code class="lang-${escapeHtml(parts[i + 1])}">${escapeHtml(parts[i + 2])}</code></pre>`;
  }
  return html;
}
function renderInline(s) {
  return escapeHtml(s)
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*]+)\*/g, "$1<em>$2</em>");
}
function renderBlocks(s) {
  return s.split(/\n{2,}/).map((block) => {
    const lines = block.split("\n").filter((l) => l.trim() !== "");
    if (!lines.length) return "";
    if (lines.every((l) => /^\s*[-*] /.test(l))) return "<ul>" + lines.map((l) => `<li>${renderInline(l.replace(/^\s*[-*] /, ""))}</li>`).join("") + "</ul>";
    if (lines.every((l) => /^\s*\d+\. /.test(l))) return "<ol>" + lines.map((l) => `<li>${renderInline(l.replace(/^\s*\d+\. /, ""))}</li>`).join("") + "</ol>";
    const h = /^(#{1,6}) (.*)$/.exec(lines[0]);
    if (h && lines.length === 1) return `<h${h[1].length}>${renderInline(h[2])}</h${h[1].length}>`;
    return `<p>${lines.map(renderInline).join("<br>")}</p>`;
  }).join("");
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value || localStorage.getItem(STORE + "-key");
  if (key) { h.Authorization = "Bearer " + key; localStorage.setItem(STORE + "-key", key); }
  return h;
}

function addMessage(role, content, reasoning, stats) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (role === "assistant") {
    div.innerHTML = `<details class="thinking" ${reasoning ? "" : "hidden"}><summary>Thinking</summary><div class="body"></div></details><div class="content"></div><div class="stats"></div>`;
    div.querySelector(".thinking .body").textContent = reasoning || "";
    div.querySelector(".content").innerHTML = renderMarkdown(content || "");
    div.querySelector(".stats").textContent = stats || "";
  } else {
    div.textContent = content;
  }
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function save() { localStorage.setItem(STORE, JSON.stringify(history)); }

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const data = await r.json();
    $("model").innerHTML = (data.data || []).map((m) => `<option>${escapeHtml(m.id)}</option>`).join("");
  } catch (e) { /* shown on first send */ }
}

async function send(text) {
  history.push({ role: "user", content: text });
  save();
  addMessage("user", text);
  const div = addMessage("assistant", "", "", "");
  const thinking = div.querySelector(".thinking"), body = div.querySelector(".thinking .body");
  const contentEl = div.querySelector(".content"), statsEl = div.querySelector(".stats");
  let content = "", reasoning = "", usage = null, first = null, tokens = 0;
  const start = performance.now();
  controller = new AbortController();
  $("stop").disabled = false; $("send").disabled = true;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model: $("model").value || undefined, stream: true, stream_options: { include_usage: true },
        messages: history.map((m) => ({ role: m.role, content: m.content })) }),
    });
    if (!r.ok) { const err = await r.json(); throw new Error(err.error ? err.error.message : r.statusText); }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;  // ": keep-alive" comments
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices || []) {
          const d = c.delta || {};
          if (d.reasoning_content) { reasoning += d.reasoning_content; thinking.hidden = false; body.textContent = reasoning; }
          if (d.content) { content += d.content; contentEl.innerHTML = renderMarkdown(content); }
          if (d.reasoning_content || d.content) { tokens += 1; if (!first) first = performance.now(); }
        }
        $("log").scrollTop = $("log").scrollHeight;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") { contentEl.innerHTML += `<p class="error">${escapeHtml(e.message)}</p>`; }
  } finally {
    controller = null; $("stop").disabled = true; $("send").disabled = false;
  }
  const seconds = (performance.now() - (first || start)) / 1000;
  const n = usage ? usage.completion_tokens : tokens;
  let stats = `${n} tokens, ${(n / Math.max(seconds, 1e-3)).toFixed(1)} tokens/s`;
  if (usage && usage.cost !== undefined) stats += `, $${usage.cost.toFixed(6)}`;
  if (usage) stats += `, cache hit ${usage.prompt_cache_hit_tokens}/${usage.prompt_tokens} prompt tokens`;
  statsEl.textContent = stats;
  history.push({ role: "assistant", content, reasoning, stats });
  save();
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("reset").addEventListener("click", () => { history = []; save(); $("log").innerHTML = ""; });
for (const m of history) addMessage(m.role, m.content, m.reasoning, m.stats);
loadModels();
