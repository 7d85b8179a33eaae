// nanoseek web chat: conversations kept in the browser (list, rename, delete, export), per-conversation settings,
// streamed answers with a live, collapsible thinking panel, Markdown/code/math (render.js), stop, regenerate,
// edit-and-resend, copy, per-reply tokens, speed, cache hits and cost, the policy layer's interventions and tool
// calls shown as they happen. No build step: plain browser JavaScript and the vendored libraries.
"use strict";
const $ = (id) => document.getElementById(id);
const STORE = "nanoseek-conversations", CURRENT = "nanoseek-current", KEY = "nanoseek-key", THEME = "nanoseek-theme";
const DEFAULTS = { system: "", temperature: 0.6, max_tokens: 1024, model: "" };

let conversations = JSON.parse(localStorage.getItem(STORE) || "{}");
let current = localStorage.getItem(CURRENT);
let controller = null;

function save() {
  localStorage.setItem(STORE, JSON.stringify(conversations));
  localStorage.setItem(CURRENT, current || "");
}
function conv() { return conversations[current]; }
function newConversation() {
  const id = "c" + Date.now().toString(36) + Math.random().toString(36).slice(2, 6);
  conversations[id] = { id, title: "New chat", created: Date.now(), settings: { ...DEFAULTS, model: $("model").value },
                        messages: [] };
  current = id;
  save();
  showConversation();
}

// ---- sidebar ----
function renderList() {
  const ul = $("conversations");
  ul.innerHTML = "";
  const list = Object.values(conversations).sort((a, b) => b.created - a.created);
  for (const c of list) {
    const li = document.createElement("li");
    li.className = c.id === current ? "active" : "";
    const open = document.createElement("button");
    open.className = "open"; open.type = "button"; open.textContent = c.title;
    open.addEventListener("click", () => { if (!controller) { current = c.id; save(); showConversation(); } });
    const rename = button("✎", "Rename", () => {
      const title = prompt("Rename conversation", c.title);
      if (title && title.trim()) { c.title = title.trim(); save(); renderList(); }
    });
    const del = button("×", "Delete", () => {
      if (!confirm(`Delete "${c.title}"?`)) return;
      delete conversations[c.id];
      if (current === c.id) current = Object.keys(conversations)[0] || null;
      save();
      current ? showConversation() : newConversation();
    });
    rename.className = "rename"; del.className = "delete";
    li.append(open, rename, del);
    ul.appendChild(li);
  }
}
function button(label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button"; b.textContent = label; b.title = title; b.setAttribute("aria-label", title);
  b.addEventListener("click", onClick);
  return b;
}

// ---- settings (per conversation) ----
function loadSettings() {
  const s = conv().settings;
  $("system").value = s.system; $("temperature").value = s.temperature; $("max-tokens").value = s.max_tokens;
  if (s.model && [...$("model").options].some((o) => o.value === s.model)) $("model").value = s.model;
}
function storeSettings() {
  if (!conv()) return;
  conv().settings = { system: $("system").value, temperature: Number($("temperature").value),
                      max_tokens: Number($("max-tokens").value), model: $("model").value };
  save();
}

// ---- messages ----
function showConversation() {
  $("log").innerHTML = "";
  $("title").textContent = conv().title;
  loadSettings();
  conv().messages.forEach((m, i) => addMessage(m, i));
  renderList();
}

function statsText(s) {
  if (!s) return "";
  let text = `${s.tokens} tokens, ${s.tps.toFixed(1)} tokens/s`;
  if (s.prompt_tokens !== undefined) text += `, cache hit ${s.cache_hit}/${s.prompt_tokens} prompt tokens`;
  if (s.cost !== undefined && s.cost !== null) text += `, cost $${s.cost.toFixed(6)}`;
  return text;
}

function addMessage(m, index) {
  const div = document.createElement("div");
  div.className = "msg " + m.role;
  div.dataset.index = index;
  if (m.role === "assistant") {
    div.innerHTML = `<details class="thinking"><summary>Thinking</summary><div class="body"></div></details>
      <div class="tools"></div><div class="content"></div><div class="policy" hidden></div>
      <div class="meta"><span class="stats"></span></div>`;
    fillAssistant(div, m, false);
    const meta = div.querySelector(".meta");
    meta.append(button("Copy", "Copy the reply", () => copy(m.content)),
                button("Regenerate", "Regenerate this reply", () => regenerate(index)));
  } else {
    div.innerHTML = `<div class="content"></div><div class="meta"></div>`;
    div.querySelector(".content").textContent = m.content;
    div.querySelector(".meta").append(button("Edit", "Edit and resend", () => edit(index, div)),
                                      button("Copy", "Copy the message", () => copy(m.content)));
  }
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function fillAssistant(div, m, streaming) {
  const thinking = div.querySelector(".thinking");
  thinking.hidden = !m.reasoning;
  thinking.open = streaming && !m.content;  // live while the model thinks, collapsed once it answers
  div.querySelector(".thinking .body").textContent = m.reasoning || "";
  div.querySelector(".content").innerHTML = renderMarkdown(m.content || "");
  const tools = div.querySelector(".tools");
  tools.innerHTML = "";
  for (const call of m.tool_calls || []) {
    const card = document.createElement("details");
    card.className = "tool-call";
    card.innerHTML = `<summary></summary><pre><code></code></pre>`;
    card.querySelector("summary").textContent = `Tool call: ${call.name}`;
    card.querySelector("code").textContent = call.arguments;
    tools.appendChild(card);
  }
  const policy = div.querySelector(".policy");
  policy.hidden = !m.policy;
  policy.textContent = m.policy ? `Policy intervened: ${m.policy}` : "";
  div.querySelector(".stats").textContent = m.error ? m.error : statsText(m.stats);
  div.classList.toggle("error", Boolean(m.error));
}

async function copy(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {  // no clipboard permission (plain http): the old way
    const area = document.createElement("textarea");
    area.value = text; document.body.appendChild(area); area.select();
    document.execCommand("copy"); area.remove();
  }
}

function regenerate(index) {
  if (controller) return;
  conv().messages = conv().messages.slice(0, index);
  save(); showConversation(); complete();
}

function edit(index, div) {
  if (controller) return;
  const content = div.querySelector(".content");
  const area = document.createElement("textarea");
  area.className = "editor"; area.value = conv().messages[index].content; area.rows = 3;
  content.replaceWith(area);
  area.focus();
  const send = button("Send", "Resend the edited message", () => {
    const text = area.value.trim();
    if (!text) return;
    conv().messages = conv().messages.slice(0, index);
    conv().messages.push({ role: "user", content: text });
    save(); showConversation(); complete();
  });
  send.className = "resend";
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send.click(); }
    if (e.key === "Escape") showConversation();
  });
  div.querySelector(".meta").replaceChildren(send, button("Cancel", "Cancel editing", showConversation));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value || localStorage.getItem(KEY);
  if (key) { h.Authorization = "Bearer " + key; localStorage.setItem(KEY, key); }
  return h;
}

function requestMessages() {
  const s = conv().settings, out = [];
  if (s.system.trim()) out.push({ role: "system", content: s.system });
  for (const m of conv().messages) {
    if (m.role === "assistant" && m.error) continue;
    out.push({ role: m.role, content: m.content || "" });
  }
  return out;
}

// Streams one answer to the conversation as it stands.
async function complete() {
  storeSettings();
  const s = conv().settings, messages = requestMessages();
  const m = { role: "assistant", content: "", reasoning: "", tool_calls: [], stats: null, policy: null };
  conv().messages.push(m);
  const index = conv().messages.length - 1;
  const div = addMessage(m, index);
  let usage = null, first = null, chunks = 0;
  const start = performance.now();
  controller = new AbortController();
  $("stop").disabled = false; $("send").disabled = true;
  try {
    const body = { stream: true, stream_options: { include_usage: true }, messages, temperature: s.temperature,
                   max_tokens: s.max_tokens };
    if (s.model) body.model = s.model;
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), signal: controller.signal,
                                                    body: JSON.stringify(body) });
    m.policy = r.headers.get("X-Nanoseek-Policy");
    if (!r.ok) {
      let message = r.statusText;
      try { const err = await r.json(); message = err.error ? err.error.message : message; } catch (e) { /* not JSON */ }
      throw new Error(`${r.status}: ${message}`);
    }
    const reader = r.body.getReader(), decoder = new TextDecoder();
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
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices || []) {
          const d = c.delta || {};
          if (d.reasoning_content) m.reasoning += d.reasoning_content;
          if (d.content) m.content += d.content;
          for (const t of d.tool_calls || []) {
            if (!m.tool_calls[t.index]) m.tool_calls[t.index] = { name: t.function.name || "", arguments: "" };
            m.tool_calls[t.index].arguments += t.function.arguments || "";
          }
          if (c.finish_reason === "content_filter" && !m.policy) m.policy = "content filter";
          if (d.reasoning_content || d.content || d.tool_calls) { chunks += 1; if (!first) first = performance.now(); }
        }
        fillAssistant(div, m, true);
        $("log").scrollTop = $("log").scrollHeight;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") m.error = e.message;
  } finally {
    controller = null; $("stop").disabled = true; $("send").disabled = false;
  }
  const seconds = (performance.now() - (first || start)) / 1000;
  const tokens = usage ? usage.completion_tokens : chunks;
  m.stats = { tokens, tps: tokens / Math.max(seconds, 1e-3) };
  if (usage) Object.assign(m.stats, { prompt_tokens: usage.prompt_tokens, cache_hit: usage.prompt_cache_hit_tokens,
                                      cost: usage.cost });
  if (conv().title === "New chat" && conv().messages[0]) {
    conv().title = conv().messages[0].content.slice(0, 40) || "New chat";
    renderList(); $("title").textContent = conv().title;
  }
  save();
  fillAssistant(div, m, false);
}

function send() {
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  const m = { role: "user", content: text };
  conv().messages.push(m);
  addMessage(m, conv().messages.length - 1);
  save();
  complete();
}

// ---- theme, export, keys ----
function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  $("hljs-dark").disabled = theme !== "dark"; $("hljs-light").disabled = theme === "dark";
  $("theme").textContent = theme === "dark" ? "Light mode" : "Dark mode";
}
$("theme").addEventListener("click", () => {
  const theme = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
  localStorage.setItem(THEME, theme); applyTheme(theme);
});
$("export").addEventListener("click", () => {
  const blob = new Blob([JSON.stringify(Object.values(conversations), null, 2)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = "nanoseek-conversations.json"; a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
});
$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && controller) controller.abort();
  if (e.key.toLowerCase() === "o" && e.ctrlKey && e.shiftKey) { e.preventDefault(); if (!controller) newConversation(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => { if (!controller) newConversation(); });
for (const id of ["system", "temperature", "max-tokens", "model"]) $(id).addEventListener("change", storeSettings);

async function start() {
  applyTheme(localStorage.getItem(THEME) ||
             (window.matchMedia && matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light"));
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const data = await r.json();
    for (const model of data.data || []) {
      const o = document.createElement("option");
      o.value = o.textContent = model.id;
      $("model").appendChild(o);
    }
  } catch (e) { /* a key may be needed: the first send says so */ }
  if (!current || !conversations[current]) newConversation(); else showConversation();
}
start();
