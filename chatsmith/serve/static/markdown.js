// A small Markdown renderer that builds DOM nodes and never parses HTML.
//
// Model output is untrusted text: every piece of it reaches the page through createElement +
// textContent (or createTextNode), so `<script>` or `<img onerror=...>` in a reply is shown as
// those characters and runs nothing. Supported: fenced code blocks, inline code, headings,
// bullet and numbered lists, block quotes, **bold**, *italic*, and http(s) links.
"use strict";

const Markdown = (() => {
  function inline(parent, text) {
    // tokens: `code`, **bold**, *italic*, [label](http...). No _italic_: it would mangle
    // identifiers such as __init__ or snake_case names, common in replies about code.
    const re = /(`+)([\s\S]*?)\1|\*\*([^*]+)\*\*|\*([^*\s](?:[^*]*[^*\s])?)\*|\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g;
    let last = 0, m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      let el;
      if (m[1] !== undefined) { el = document.createElement("code"); el.textContent = m[2]; }
      else if (m[3] !== undefined) { el = document.createElement("strong"); inline(el, m[3]); }
      else if (m[4] !== undefined) { el = document.createElement("em"); inline(el, m[4]); }
      else {
        el = document.createElement("a");
        el.textContent = m[5];
        el.href = m[6];  // only http(s): javascript: and data: URLs never match the pattern
        el.target = "_blank";
        el.rel = "noopener noreferrer";
      }
      parent.appendChild(el);
      last = re.lastIndex;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }

  function render(text) {
    const root = document.createDocumentFragment();
    const lines = text.split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      const fence = line.match(/^\s*(```+|~~~+)\s*([\w+#.-]*)\s*$/);
      if (fence) {  // a code block runs to the closing fence, or to the end while still streaming
        const code = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(fence[1])) code.push(lines[i++]);
        i++;
        const pre = document.createElement("pre");
        const el = document.createElement("code");
        if (fence[2]) { el.dataset.lang = fence[2]; pre.dataset.lang = fence[2]; }
        el.textContent = code.join("\n");
        pre.appendChild(el);
        root.appendChild(pre);
        continue;
      }
      const h = line.match(/^(#{1,6})\s+(.*)$/);
      if (h) {
        const el = document.createElement("h" + Math.min(6, h[1].length + 2));
        inline(el, h[2]);
        root.appendChild(el);
        i++;
        continue;
      }
      const item = /^\s*([-*+]|\d+[.)])\s+/;
      if (item.test(line)) {
        const ordered = /^\s*\d/.test(line);
        const list = document.createElement(ordered ? "ol" : "ul");
        while (i < lines.length && item.test(lines[i])) {
          const li = document.createElement("li");
          inline(li, lines[i].replace(item, ""));
          list.appendChild(li);
          i++;
        }
        root.appendChild(list);
        continue;
      }
      if (/^\s*>/.test(line)) {
        const q = document.createElement("blockquote");
        const body = [];
        while (i < lines.length && /^\s*>/.test(lines[i])) body.push(lines[i++].replace(/^\s*>\s?/, ""));
        inline(q, body.join("\n"));
        root.appendChild(q);
        continue;
      }
      if (!line.trim()) { i++; continue; }
      const para = [];  // a paragraph: consecutive plain lines, line breaks kept (pre-wrap)
      while (i < lines.length && lines[i].trim() && !/^\s*(```|~~~|#{1,6}\s|>|[-*+]\s|\d+[.)]\s)/.test(lines[i])) {
        para.push(lines[i++]);
      }
      if (!para.length) para.push(lines[i++]);
      const p = document.createElement("p");
      inline(p, para.join("\n"));
      root.appendChild(p);
    }
    return root;
  }

  return { render };
})();
