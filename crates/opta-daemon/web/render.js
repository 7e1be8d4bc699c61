// Building blocks of the page: safe text, markdown, diffs, tool cards and permission prompts.
// Text from the daemon, a model or another client only ever reaches the DOM as text, or as
// markdown rendered by marked and sanitised by DOMPurify.

import { marked } from "./vendor/marked.js";
import DOMPurify from "./vendor/purify.js";

marked.setOptions({ gfm: true, breaks: false });
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

// C0/C1 controls (but tab and newline), and the bidirectional overrides that can make text
// read differently from what it is.
const HIDDEN = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]/g;

/** `text` with invisible and control characters shown as `\u{..}` escapes. @param {unknown} text */
export function visible(text) {
  return String(text ?? "").replace(
    HIDDEN,
    (c) => `\\u{${(c.codePointAt(0) ?? 0).toString(16)}}`,
  );
}

/**
 * An element with attributes and children (strings become text nodes).
 * @param {string} tag
 * @param {Record<string, string | boolean | undefined>} [attrs]
 * @param {(Node | string | null | undefined | false)[]} [children]
 * @returns {HTMLElement}
 */
export function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === false) continue;
    if (key === "class") node.className = String(value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === "string" ? document.createTextNode(visible(child)) : child);
  }
  return node;
}

/** Renders markdown into `target` (sanitised). @param {HTMLElement} target @param {string} text */
export function renderMarkdown(target, text) {
  const html = /** @type {string} */ (marked.parse(visible(text), { async: false }));
  target.innerHTML = DOMPurify.sanitize(html);
}

/** A unified diff with its added, removed and hunk lines marked. @param {string} diff */
export function diffBlock(diff) {
  const pre = el("pre", { class: "diff" });
  for (const line of visible(diff).split("\n")) {
    let kind = "";
    if (line.startsWith("+") && !line.startsWith("+++")) kind = "add";
    else if (line.startsWith("-") && !line.startsWith("---")) kind = "del";
    else if (line.startsWith("@@")) kind = "hunk";
    const span = el("span", kind ? { class: kind } : {});
    span.textContent = `${line}\n`;
    pre.append(span);
  }
  return pre;
}

/** The one argument that says most about a call. @param {any} args */
function keyArgument(args) {
  if (!args || typeof args !== "object") return args == null ? "" : String(args);
  for (const key of ["path", "command", "pattern", "query", "url", "processId", "id"]) {
    if (typeof args[key] === "string") return args[key];
  }
  const first = Object.values(args).find((v) => typeof v === "string");
  return typeof first === "string" ? first : "";
}

/** @param {any} value */
function pretty(value) {
  if (typeof value === "string") return value;
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

/** A tool call card: collapsed to one line (name, key argument, status), open for details. */
export class ToolCard {
  /** @param {string} id @param {string} name @param {any} args */
  constructor(id, name, args) {
    this.id = id;
    this.status = el("span", { class: "status" }, ["running…"]);
    this.body = el("div", { class: "body" }, [
      el("span", { class: "label" }, ["arguments"]),
      el("pre", {}, [pretty(args)]),
    ]);
    this.node = el("details", { class: "tool running", "data-tool-id": id }, [
      el("summary", {}, [
        el("span", { class: "name" }, [name]),
        el("span", { class: "arg" }, [keyArgument(args)]),
        this.status,
      ]),
      this.body,
    ]);
  }

  /**
   * The call's result: `{ok: true, output}` or `{ok: false, error}` (older: any JSON).
   * @param {any} result @param {number | null} [durationMs] @param {string | null} [approvedBy]
   */
  finish(result, durationMs, approvedBy) {
    const failed = result && typeof result === "object" && (result.ok === false || result.error);
    this.node.classList.remove("running");
    this.node.classList.add(failed ? "failed" : "ok");
    const time = typeof durationMs === "number" ? ` · ${formatMs(durationMs)}` : "";
    this.status.textContent = `${failed ? "✗ failed" : "✓ done"}${time}`;
    const text = failed
      ? pretty(result.error ?? result)
      : pretty(result && typeof result === "object" && "output" in result ? result.output : result);
    this.body.append(el("span", { class: "label" }, [failed ? "error" : "result"]));
    this.body.append(el("pre", {}, [text || "(no output)"]));
    // "mode": the session's mode allows the tool without asking; nothing to say.
    if (approvedBy === "grant") this.body.append(el("span", { class: "muted" }, ["allowed by a session grant"]));
    else if (approvedBy && approvedBy !== "mode") this.body.append(el("span", { class: "muted" }, [`approved by ${approvedBy}`]));
  }
}

/**
 * A permission prompt: summary, diff or arguments, and Allow / Deny / Always buttons.
 * @param {any} request `permission.request`'s payload
 * @param {(decision: "allow"|"deny", remember: boolean) => void} answer
 */
export function permissionCard(request, answer) {
  const buttons = el("div", { class: "actions" }, [
    el("button", { type: "button", class: "primary", "data-decision": "allow" }, ["Allow"]),
    el("button", { type: "button", "data-decision": "always" }, ["Always for this session"]),
    el("button", { type: "button", class: "danger", "data-decision": "deny" }, ["Deny"]),
  ]);
  buttons.addEventListener("click", (event) => {
    const target = /** @type {HTMLElement} */ (event.target);
    const decision = target.closest("button")?.dataset.decision;
    if (!decision) return;
    for (const b of buttons.querySelectorAll("button")) b.disabled = true;
    answer(decision === "deny" ? "deny" : "allow", decision === "always");
  });
  const detail = request.diff
    ? diffBlock(request.diff)
    : el("pre", {}, [pretty(request.args)]);
  return el("div", { class: "permission", "data-request-id": request.requestId }, [
    el("span", { class: "label" }, [`${request.toolName} wants permission`]),
    el("div", { class: "summary" }, [request.summary || request.toolName]),
    detail,
    buttons,
  ]);
}

/** @param {number} ms */
export function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

/** "3 min ago". @param {string} iso */
export function ago(iso) {
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (!Number.isFinite(seconds)) return "";
  if (seconds < 45) return "just now";
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}
