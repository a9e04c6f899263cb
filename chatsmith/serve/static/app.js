// The chatsmith chat page: streamed replies from /v1/chat/completions, stop, regenerate, new chat,
// conversations and settings kept in this browser's localStorage. Model text is rendered by
// Markdown.render, which only ever creates DOM nodes from text (no HTML strings reach the DOM).
// Tools the server runs itself (serve --tools calculator) arrive as `server_tool_calls` deltas and
// are shown above the reply, one collapsible entry per call (its arguments and result as text).
// A translation model (its /v1/models card says family "seq2seq") gets the last user turn alone and
// no temperature, so the server's default decoding (greedy or serve --num-beams) translates it.
"use strict";

const STORE = "chatsmith.conversations";
const SETTINGS = "chatsmith.settings";
const $ = (id) => document.getElementById(id);

const state = {
  conversations: load(STORE, []),  // [{id, title, messages: [{role, content}], updated}]
  current: null,
  controller: null,  // AbortController of the reply being streamed
  model: null,
  translator: false,  // the server's model is a translator: each message is translated, not answered
};

function load(key, fallback) {
  try { const v = JSON.parse(localStorage.getItem(key)); return v ?? fallback; } catch { return fallback; }
}
function save() {
  try { localStorage.setItem(STORE, JSON.stringify(state.conversations)); } catch { /* quota: keep going */ }
}
function settings() {
  return {
    system: $("system").value,
    temperature: parseFloat($("temperature").value),
    maxTokens: parseInt($("max-tokens").value, 10) || null,
    apiKey: $("api-key").value,
  };
}
function saveSettings() { localStorage.setItem(SETTINGS, JSON.stringify(settings())); }

function conversation() { return state.conversations.find((c) => c.id === state.current) || null; }

function newConversation() {
  const c = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 7), title: "New chat",
              messages: [], updated: Date.now() };
  state.conversations.unshift(c);
  state.current = c.id;
  save();
  return c;
}

// --- rendering ----------------------------------------------------------------------------------
function renderList() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of state.conversations) {
    const li = document.createElement("li");
    li.className = c.id === state.current ? "active" : "";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title || "New chat";
    open.addEventListener("click", () => { if (!state.controller) { state.current = c.id; renderAll(); closeSidebar(); } });
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.title = "Delete this conversation";
    del.textContent = "\u00d7";
    del.addEventListener("click", () => {
      if (state.controller) return;
      state.conversations = state.conversations.filter((x) => x.id !== c.id);
      if (state.current === c.id) state.current = state.conversations[0]?.id ?? null;
      save();
      renderAll();
    });
    li.append(open, del);
    ul.appendChild(li);
  }
}

function messageNode(m) {
  const div = document.createElement("div");
  div.className = "message " + m.role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = m.role === "user" ? "You" : "chatsmith";
  const tools = document.createElement("div");
  tools.className = "tools";
  for (const t of m.tools || []) tools.appendChild(toolNode(t));
  const body = document.createElement("div");
  body.className = "body";
  body.appendChild(Markdown.render(m.content));
  div.append(who, tools, body);
  if (m.filtered) div.appendChild(filterNote(m.filtered));
  return div;
}

// one tool call and its result, collapsed to its name and arguments; text only, never markup
function toolNode(t) {
  const d = document.createElement("details");
  d.className = "tool-call";
  const summary = document.createElement("summary");
  summary.textContent = "\u{1F527} " + String(t.name) + "(" + String(t.arguments) + ")";
  const args = document.createElement("pre");
  args.className = "tool-arguments";
  args.textContent = String(t.arguments);
  const result = document.createElement("pre");
  result.className = "tool-result";
  result.textContent = "\u2192 " + String(t.result);
  d.append(summary, args, result);
  return d;
}

// serve --moderation: a refused request ("refusal" in the reply) or a reply stopped by the filter
// (finish_reason "content_filter") is marked under the message, so it is not mistaken for the model's own
function filterNote(kind) {
  const note = document.createElement("div");
  note.className = "filter-note";
  note.textContent = kind === "refused" ? "Content filter: this message was not sent to the model."
                                        : "Content filter: the reply was stopped here.";
  return note;
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  const c = conversation();
  if (!c || !c.messages.length) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = state.translator
      ? "Type a text: " + state.model + " replies with its translation."
      : "Start a conversation with " + (state.model || "chatsmith") + ".";
    box.appendChild(empty);
  } else {
    for (const m of c.messages) box.appendChild(messageNode(m));
  }
  box.scrollTop = box.scrollHeight;
}

function renderButtons() {
  const busy = !!state.controller;
  const c = conversation();
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("regenerate").hidden = busy || !c || !c.messages.length || c.messages[c.messages.length - 1].role !== "assistant";
}

function renderAll() { renderList(); renderMessages(); renderButtons(); }

function setStatus(text, isError) {
  $("status").textContent = text || "";
  $("status").className = isError ? "error" : "";
}

// --- talking to the server ----------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = settings().apiKey;
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function streamReply(c) {
  const s = settings();
  const history = c.messages.slice();
  const reply = { role: "assistant", content: "" };
  c.messages.push(reply);
  const box = $("messages");
  if (box.querySelector(".empty")) box.replaceChildren();
  const node = messageNode(reply);
  node.classList.add("streaming");
  box.appendChild(node);
  const body = node.querySelector(".body");
  state.controller = new AbortController();
  renderButtons();
  setStatus("");
  try {
    let r, skip = 0;
    for (;;) {  // when the conversation outgrows the model's context, leave out the oldest turns
      const messages = [];
      if (s.system.trim() && !state.translator) messages.push({ role: "system", content: s.system });
      const turns = state.translator ? history.filter((m) => m.role === "user").slice(-1) : history.slice(skip);
      for (const m of turns) messages.push({ role: m.role, content: m.content });
      const req = { model: state.model || undefined, messages, stream: true };
      if (!state.translator) req.temperature = s.temperature;
      if (s.maxTokens) req.max_tokens = s.maxTokens;
      r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(req),
                                                signal: state.controller.signal });
      if (r.ok) break;
      let err = { message: r.status + " " + r.statusText };
      try { err = (await r.json()).error; } catch { /* not JSON */ }
      if (err.code === "context_length_exceeded" && !state.translator && history.length - skip > 1) {
        skip += 2;
        setStatus("The oldest turns were left out to fit the model's context.");
        continue;
      }
      throw new Error(err.message);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {  // one server-sent event per blank line
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const choice = chunk.choices?.[0];
          const delta = choice?.delta || {};
          for (const t of delta.server_tool_calls || []) {
            (reply.tools = reply.tools || []).push(t);
            node.querySelector(".tools").appendChild(toolNode(t));
          }
          if (delta.refusal) reply.filtered = "refused";
          if (choice?.finish_reason === "content_filter" && !reply.filtered) reply.filtered = "stopped";
          const piece = delta.content;
          if (piece) {
            reply.content += piece;
            body.replaceChildren(Markdown.render(reply.content));
            box.scrollTop = box.scrollHeight;
          }
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") setStatus("Error: " + e.message, true);
  } finally {
    state.controller = null;
    node.classList.remove("streaming");
    if (!reply.content && !reply.tools && !reply.filtered) c.messages.pop();  // nothing arrived: leave no empty reply behind
    c.updated = Date.now();
    save();
    renderAll();
  }
}

async function send(text) {
  if (state.controller || !text.trim()) return;
  const c = conversation() || newConversation();
  c.messages.push({ role: "user", content: text });
  if (c.title === "New chat") c.title = text.trim().slice(0, 40);
  save();
  renderList();
  renderMessages();
  await streamReply(c);
}

async function regenerate() {
  const c = conversation();
  if (state.controller || !c || c.messages[c.messages.length - 1]?.role !== "assistant") return;
  c.messages.pop();
  renderMessages();
  await streamReply(c);
}

function closeSidebar() { document.body.classList.remove("sidebar-open"); }

// --- wiring -------------------------------------------------------------------------------------
function init() {
  const st = load(SETTINGS, {});
  if (typeof st.system === "string") $("system").value = st.system;
  if (typeof st.temperature === "number" && !Number.isNaN(st.temperature)) $("temperature").value = st.temperature;
  if (st.maxTokens) $("max-tokens").value = st.maxTokens;
  if (typeof st.apiKey === "string") $("api-key").value = st.apiKey;
  $("temperature-value").textContent = $("temperature").value;
  for (const id of ["system", "temperature", "max-tokens", "api-key"]) {
    $(id).addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; saveSettings(); });
  }
  state.current = state.conversations[0]?.id ?? null;

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("regenerate").addEventListener("click", regenerate);
  $("new-chat").addEventListener("click", () => {
    if (state.controller) return;
    const c = conversation();
    if (!c || c.messages.length) newConversation(); else state.current = c.id;
    renderAll();
    closeSidebar();
    $("input").focus();
  });
  $("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));

  fetch("/v1/models", { headers: headers() }).then((r) => r.ok ? r.json() : null).then((j) => {
    if (j && j.data && j.data[0]) {
      state.model = j.data[0].id;
      state.translator = j.data[0].chatsmith?.family === "seq2seq";
      $("model-name").textContent = state.model + (state.translator ? " (translation)" : "");
      renderMessages();
    }
  }).catch(() => {});
  renderAll();
}

init();
