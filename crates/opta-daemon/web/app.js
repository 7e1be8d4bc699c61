// The opta web client: sign-in, the live session list, and one session's history and live turn.

import {
  ApiError, SessionFeed, SessionStream, api, forgetToken, redeemCode, storeToken, storedToken,
} from "./api.js";
import {
  ToolCard, ago, el, formatMs, permissionCard, renderMarkdown, visible,
} from "./render.js";

const CLIENT_ID = "opta-web";
/** One writer per tab: several tabs are several writers of a session. */
const WRITER_ID = `web-${crypto.getRandomValues(new Uint32Array(2)).join("")}`;
const MODE_KEY = "opta.mode";

/** @param {string} id */
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

// ---------------------------------------------------------------------------------------------
// Banner: one line on top saying what is wrong with the connection, most serious first.

/** @type {Map<string, {text: string, bad: boolean, rank: number}>} */
const problems = new Map();
const RANK = { unauthorized: 3, unreachable: 2, reconnecting: 1, notice: 0 };

/** @param {keyof RANK} kind @param {string} text */
function raise(kind, text) {
  problems.set(kind, { text, bad: kind === "unauthorized", rank: RANK[kind] });
  showBanner();
}

/** @param {keyof RANK} kind */
function settle(kind) {
  problems.delete(kind);
  showBanner();
}

function showBanner() {
  const banner = $("banner");
  const worst = [...problems.values()].sort((a, b) => b.rank - a.rank)[0];
  banner.hidden = !worst;
  if (worst) {
    banner.textContent = worst.text;
    banner.classList.toggle("bad", worst.bad);
  }
}

const WRONG_TOKEN =
  "The daemon refused this token (it may have been rotated). Sign in again, or run `opta web`.";

// ---------------------------------------------------------------------------------------------
// Sign-in.

/** @param {string} [message] */
function showSignIn(message) {
  closeApp();
  $("app").hidden = true;
  $("signin").hidden = false;
  const error = $("signin-error");
  error.hidden = !message;
  error.textContent = message || "";
  $("signin-token").focus();
}

$("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = /** @type {HTMLInputElement} */ ($("signin-token"));
  storeToken(input.value.trim());
  input.value = "";
  await start();
});

$("sign-out").addEventListener("click", () => {
  forgetToken();
  showSignIn();
});

// Another tab signed in or out: follow it.
window.addEventListener("storage", (event) => {
  if (event.key !== "opta.token") return;
  if (!event.newValue) showSignIn();
  else if (!$("signin").hidden) start();
});

async function boot() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const code = fragment.get("code");
  if (code) {
    // The code works once: take it out of the address bar (and history) before anything else.
    history.replaceState(null, "", location.pathname + location.search);
    try {
      await redeemCode(code);
    } catch (error) {
      if (!storedToken()) {
        showSignIn(error instanceof ApiError ? error.message : `Could not sign in: ${error}`);
        return;
      }
      raise("notice", `${error instanceof ApiError ? error.message : error} (still signed in)`);
      setTimeout(() => settle("notice"), 8000);
    }
  }
  if (!storedToken()) {
    showSignIn();
    return;
  }
  await start();
}

async function start() {
  let health;
  try {
    health = await api("GET", "/v3/health");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      raise("unauthorized", WRONG_TOKEN);
      showSignIn("That token was refused.");
      return;
    }
    raise("unreachable", "Can't reach the opta daemon. Retrying…");
    setTimeout(start, 2000);
    return;
  }
  settle("unauthorized");
  settle("unreachable");
  $("signin").hidden = true;
  $("app").hidden = false;
  $("daemon-info").textContent = visible(`opta ${health.version}`);
  $("daemon-info").title = visible(health.daemonId);
  openApp();
}

// ---------------------------------------------------------------------------------------------
// The session list, kept live by the daemon's session feed.

/** @type {Map<string, any>} sessionId → SessionSnapshot */
const sessions = new Map();
/** @type {SessionFeed | null} */
let feed = null;
let listScheduled = false;

function openApp() {
  closeApp();
  feed = new SessionFeed({
    opened: () => {
      settle("unreachable");
      loadSessions();
    },
    change: (item) => {
      if (item.event === "session.changed") {
        sessions.set(item.session.sessionId, item.session);
        if (current && current.id === item.session.sessionId) current.showSnapshot(item.session);
      } else if (item.event === "session.deleted") {
        sessions.delete(item.sessionId);
        if (current && current.id === item.sessionId) {
          location.hash = "";
        }
      }
      scheduleList();
    },
    failed: () => checkReachable(),
  });
  loadModels();
  route();
}

function closeApp() {
  if (feed) feed.close();
  feed = null;
  if (current) current.close();
  current = null;
}

async function checkReachable() {
  try {
    await api("GET", "/v3/health");
    settle("unreachable");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      // The token was rotated under an open page: stop the streams (they would retry with
      // it for ever) and ask for the new one.
      raise("unauthorized", WRONG_TOKEN);
      showSignIn("The daemon refused the saved token.");
    } else
      raise(
        "unreachable",
        "Can't reach the opta daemon. Retrying… (if it restarted on another port, run `opta web` again)",
      );
  }
}

async function loadSessions() {
  try {
    const answer = await api("GET", "/v3/sessions?limit=200");
    sessions.clear();
    for (const s of answer.sessions) sessions.set(s.sessionId, s);
    scheduleList();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) raise("unauthorized", WRONG_TOKEN);
  }
}

function scheduleList() {
  if (listScheduled) return;
  listScheduled = true;
  requestAnimationFrame(() => {
    listScheduled = false;
    renderList();
  });
}

/** @param {any} s */
function sessionState(s) {
  if (s.activeTurnId) return { text: s.queuedTurns ? `running · ${s.queuedTurns} queued` : "running", kind: "running" };
  if (s.queuedTurns) return { text: `${s.queuedTurns} queued`, kind: "queued" };
  return null;
}

function renderList() {
  const list = $("sessions");
  const sorted = [...sessions.values()].sort((a, b) => (a.updatedAt < b.updatedAt ? 1 : -1));
  const items = sorted.map((s) => {
    const state = sessionState(s);
    const button = el("button", {
      type: "button",
      "data-session": s.sessionId,
      "aria-current": current?.id === s.sessionId ? "true" : undefined,
    }, [
      el("span", { class: "title" }, [s.title || s.sessionId]),
      el("span", { class: "meta" }, [
        state && el("span", { class: `badge ${state.kind}` }, [state.text]),
        el("span", { class: "model" }, [s.model]),
        el("span", {}, [`· ${ago(s.updatedAt)}`]),
      ]),
    ]);
    return el("li", {}, [button]);
  });
  if (items.length === 0) items.push(el("li", { class: "muted" }, ["No sessions yet."]));
  list.replaceChildren(...items);
}

$("sessions").addEventListener("click", (event) => {
  const button = /** @type {HTMLElement} */ (event.target).closest("button[data-session]");
  if (button instanceof HTMLElement && button.dataset.session) {
    location.hash = `s=${encodeURIComponent(button.dataset.session)}`;
  }
});

// ---------------------------------------------------------------------------------------------
// Models and new sessions.

/** @type {any[]} */
let models = [];

async function loadModels() {
  const list = $("model-list");
  try {
    const answer = await api("GET", "/v3/lmx/models");
    models = answer.models || [];
    list.replaceChildren(
      ...models.map((m) =>
        el("li", {}, [el("span", {}, [m.model_id]), el("span", { class: "muted" }, [m.status])]),
      ),
    );
    if (models.length === 0) list.replaceChildren(el("li", { class: "muted" }, ["none loaded"]));
  } catch (error) {
    list.replaceChildren(
      el("li", { class: "muted" }, [`unavailable: ${error instanceof Error ? error.message : error}`]),
    );
  }
  const select = /** @type {HTMLSelectElement} */ ($("new-model"));
  select.replaceChildren(
    el("option", { value: "" }, ["the daemon's default"]),
    ...models.map((m) => el("option", { value: m.model_id }, [m.model_id])),
  );
}

const dialog = /** @type {HTMLDialogElement} */ ($("new-dialog"));
$("new-session").addEventListener("click", () => {
  $("new-error").hidden = true;
  loadModels();
  dialog.showModal();
  $("new-title").focus();
});
$("new-cancel").addEventListener("click", () => dialog.close());
$("new-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const value = (/** @type {string} */ id) => /** @type {HTMLInputElement} */ ($(id)).value.trim();
  /** @type {any} */
  const body = {};
  if (value("new-title")) body.title = value("new-title");
  if (value("new-model")) body.model = value("new-model");
  if (value("new-workspace")) body.metadata = { workspace: value("new-workspace") };
  try {
    const snapshot = await api("POST", "/v3/sessions", body);
    sessions.set(snapshot.sessionId, snapshot);
    scheduleList();
    dialog.close();
    /** @type {HTMLFormElement} */ ($("new-form")).reset();
    location.hash = `s=${encodeURIComponent(snapshot.sessionId)}`;
  } catch (error) {
    const details = error instanceof ApiError && error.body?.details
      ? error.body.details.map((/** @type {any} */ d) => d.message || d.field).join("; ")
      : "";
    $("new-error").hidden = false;
    $("new-error").textContent = visible(
      `${error instanceof Error ? error.message : error}${details ? `: ${details}` : ""}`,
    );
  }
});

// ---------------------------------------------------------------------------------------------
// One session: its history, then its live events.

/** @type {SessionView | null} */
let current = null;

function route() {
  const id = new URLSearchParams(location.hash.slice(1)).get("s");
  if (current && current.id === id) return;
  if (current) current.close();
  current = null;
  $("app").classList.toggle("has-session", Boolean(id));
  $("session").hidden = !id;
  $("empty").hidden = Boolean(id);
  if (id) current = new SessionView(id);
  scheduleList();
}
window.addEventListener("hashchange", route);
$("back").addEventListener("click", () => {
  location.hash = "";
});

/** One turn as the log shows it: the user's message, then text, thinking, tools, prompts. */
class TurnView {
  /** @param {HTMLElement} log @param {string} turnId */
  constructor(log, turnId) {
    this.turnId = turnId;
    this.node = el("div", { class: "turn", "data-turn": turnId });
    log.append(this.node);
    /** @type {{node: HTMLElement, text: string} | null} */
    this.answer = null;
    /** @type {{node: HTMLElement, pre: HTMLElement} | null} */
    this.reasoning = null;
    this.renderScheduled = false;
  }

  /** @param {string} content */
  user(content) {
    this.node.append(el("div", { class: "msg user" }, [content]));
  }

  /** @param {string} delta */
  text(delta) {
    if (!this.answer) {
      this.answer = { node: el("div", { class: "msg assistant md" }), text: "" };
      this.node.append(this.answer.node);
      this.reasoning = null;
    }
    this.answer.text += delta;
    if (!this.renderScheduled) {
      this.renderScheduled = true;
      requestAnimationFrame(() => this.render());
    }
  }

  render() {
    this.renderScheduled = false;
    if (this.answer) renderMarkdown(this.answer.node, this.answer.text);
  }

  /** @param {string} delta */
  thinking(delta) {
    if (!this.reasoning) {
      const pre = el("pre");
      const node = el("details", { class: "thinking" }, [el("summary", {}, ["Thinking"]), pre]);
      this.reasoning = { node, pre };
      this.node.append(node);
    }
    this.reasoning.pre.textContent += visible(delta);
  }

  /** Text after a tool call is a new paragraph of the answer, below the card. */
  breakText() {
    if (this.answer) this.render();
    this.answer = null;
    this.reasoning = null;
  }

  /** @param {Node} node */
  add(node) {
    this.breakText();
    this.node.append(node);
  }

  /** @param {string} text @param {boolean} [error] */
  note(text, error = false) {
    this.add(el("div", { class: error ? "note error" : "note" }, [text]));
  }
}

class SessionView {
  /** @param {string} id */
  constructor(id) {
    this.id = id;
    this.log = $("log");
    this.log.replaceChildren(el("div", { class: "note" }, ["Loading…"]));
    /** @type {Map<string, TurnView>} */
    this.turns = new Map();
    /** @type {Map<string, ToolCard>} */
    this.tools = new Map();
    /** @type {Map<string, HTMLElement>} */
    this.prompts = new Map();
    /** @type {SessionStream | null} */
    this.stream = null;
    this.closed = false;
    /** @type {any} */
    this.snapshot = sessions.get(id) || null;
    if (this.snapshot) this.showSnapshot(this.snapshot);
    this.load();
  }

  async load() {
    let detail;
    try {
      detail = await api("GET", `/v3/sessions/${encodeURIComponent(this.id)}`);
    } catch (error) {
      if (this.closed) return;
      this.log.replaceChildren(
        el("div", { class: "note error" }, [error instanceof Error ? error.message : String(error)]),
      );
      if (error instanceof ApiError && error.status === 401) raise("unauthorized", WRONG_TOKEN);
      return;
    }
    if (this.closed) return;
    this.showSnapshot(detail);
    let messages = detail.messages || [];
    let afterSeq = detail.lastSeq ?? 0;
    if (detail.activeTurnId) {
      // A turn is running: its messages so far are replayed as events from its start instead
      // (the daemon keeps a running turn's tokens for replay), so its streamed text shows too.
      const start = await this.findTurnStart(detail.activeTurnId, afterSeq);
      if (start !== null) {
        afterSeq = start - 1;
        const lastUser = messages.map((/** @type {any} */ m) => m.role).lastIndexOf("user");
        if (lastUser >= 0) messages = messages.slice(0, lastUser);
      }
    }
    this.log.replaceChildren();
    this.history(messages);
    this.stream = new SessionStream(this.id, afterSeq, {
      event: (envelope) => this.onEvent(envelope),
      state: (state, detail) => this.onStreamState(state, detail),
    });
    this.scrollToEnd(true);
  }

  /** The seq of a turn's `turn.start`, from the durable log. @param {string} turnId @param {number} lastSeq */
  async findTurnStart(turnId, lastSeq) {
    for (const after of [Math.max(0, lastSeq - 2000), 0]) {
      try {
        const answer = await api(
          "GET",
          `/v3/sessions/${encodeURIComponent(this.id)}/events?afterSeq=${after}`,
        );
        const start = answer.events.find(
          (/** @type {any} */ e) => e.event === "turn.start" && e.payload.turnId === turnId,
        );
        if (start) return start.seq;
      } catch {
        return null;
      }
      if (after === 0) break;
    }
    return null;
  }

  /** Renders stored messages. @param {any[]} messages */
  history(messages) {
    /** @type {TurnView | null} */
    let turn = null;
    for (const message of messages) {
      const text = contentText(message.content);
      if (message.role === "user") {
        turn = new TurnView(this.log, "");
        turn.user(text);
      } else if (message.role === "assistant") {
        turn = turn || new TurnView(this.log, "");
        if (text.trim()) {
          turn.text(text);
          turn.render();
        }
        for (const call of message.tool_calls || []) {
          let args = call.function?.arguments;
          try {
            args = JSON.parse(args);
          } catch {
            /* shown as it came */
          }
          const card = new ToolCard(call.id, call.function?.name || "tool", args);
          this.tools.set(call.id, card);
          turn.add(card.node);
        }
        turn.breakText();
      } else if (message.role === "tool") {
        const card = this.tools.get(message.tool_call_id);
        if (card && card.node.classList.contains("running")) card.finish({ ok: true, output: text });
      }
    }
  }

  /** @param {string} turnId */
  turn(turnId) {
    let turn = this.turns.get(turnId);
    if (!turn) {
      turn = new TurnView(this.log, turnId);
      this.turns.set(turnId, turn);
    }
    return turn;
  }

  /** @param {any} envelope */
  onEvent(envelope) {
    const p = envelope.payload || {};
    const follow = this.nearEnd();
    switch (envelope.event) {
      case "session.snapshot":
      case "session.updated":
        this.showSnapshot(p.snapshot);
        if (p.snapshot) {
          sessions.set(p.snapshot.sessionId, p.snapshot);
          scheduleList();
        }
        break;
      case "turn.start":
        this.turn(p.turnId).user(p.content || "");
        break;
      case "turn.token":
        this.turn(p.turnId).text(p.text);
        break;
      case "turn.thinking":
        this.turn(p.turnId).thinking(p.text);
        break;
      case "turn.progress":
        this.turn(p.turnId).note(p.message);
        break;
      case "tool.start": {
        const card = new ToolCard(p.id, p.name, p.args);
        this.tools.set(p.id, card);
        this.turn(p.turnId).add(card.node);
        break;
      }
      case "tool.end": {
        let card = this.tools.get(p.id);
        if (!card) {
          card = new ToolCard(p.id, p.name, null);
          this.turn(p.turnId).add(card.node);
        }
        if (card.node.classList.contains("running")) card.finish(p.result, p.durationMs, p.approvedBy);
        break;
      }
      case "permission.request": {
        const node = permissionCard(p, (decision, remember) =>
          this.answer(p.requestId, decision, remember, node),
        );
        this.prompts.set(p.requestId, node);
        this.turn(p.turnId).add(node);
        break;
      }
      case "permission.resolved": {
        const node = this.prompts.get(p.requestId);
        this.prompts.delete(p.requestId);
        const verb = p.decision === "allow" ? "✓ allowed" : "✗ denied";
        const note = el("div", { class: "note" }, [`${verb} by ${p.decidedBy}`]);
        if (node) node.replaceWith(note);
        else this.turn(p.turnId).add(note);
        break;
      }
      case "turn.done": {
        const s = p.stats || {};
        const turn = this.turn(p.turnId);
        turn.breakText();
        const tokens = s.completionTokens ?? s.tokens ?? 0;
        const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
        if (typeof s.elapsed === "number") parts.push(formatMs(s.elapsed * 1000));
        if (s.speed) parts.push(`${Math.round(s.speed)} tok/s`);
        if (s.toolCalls) parts.push(`${s.toolCalls} tool call${s.toolCalls === 1 ? "" : "s"}`);
        turn.node.append(el("div", { class: "stats" }, [parts.join(" · ")]));
        this.closePrompts(p.turnId);
        break;
      }
      case "turn.error": {
        const code = p.code ? ` (${p.code})` : "";
        this.turn(p.turnId).note(`${p.message}${code}`, p.code !== "cancelled");
        this.closePrompts(p.turnId);
        break;
      }
      case "background.status": {
        const proc = p.process || {};
        if (proc.state !== "running") {
          const label = proc.label || proc.command || proc.processId;
          this.log.append(el("div", { class: "note" }, [`background ${label}: ${proc.state}`]));
        }
        break;
      }
      default:
        break; // Newer events this page does not know: ignored, as the protocol asks.
    }
    if (follow) this.scrollToEnd();
  }

  /** Prompts of an ended turn cannot be answered any more. @param {string} turnId */
  closePrompts(turnId) {
    for (const [id, node] of this.prompts) {
      const turn = this.turns.get(turnId);
      if (turn && turn.node.contains(node)) {
        node.replaceWith(el("div", { class: "note" }, ["permission request closed with its turn"]));
        this.prompts.delete(id);
      }
    }
  }

  /**
   * @param {string} requestId @param {"allow"|"deny"} decision @param {boolean} remember
   * @param {HTMLElement} node
   */
  async answer(requestId, decision, remember, node) {
    /** @type {any} */
    const body = { requestId, decision, decidedBy: "web" };
    if (remember) body.remember = "session";
    try {
      await api(
        "POST",
        `/v3/sessions/${encodeURIComponent(this.id)}/permissions/${encodeURIComponent(requestId)}`,
        body,
      );
    } catch (error) {
      // 409: someone decided first; their `permission.resolved` removes the prompt.
      if (error instanceof ApiError && error.status === 409) return;
      for (const b of node.querySelectorAll("button")) b.disabled = false;
      node.append(el("div", { class: "error" }, [error instanceof Error ? error.message : String(error)]));
    }
  }

  /** @param {"live"|"reconnecting"|"unauthorized"|"gone"} state @param {string} [detail] */
  onStreamState(state, detail) {
    if (state === "live") {
      settle("reconnecting");
      settle("unreachable");
      // Back from a drop: the list's feed need not wait out its own retry.
      feed?.reconnectIfDown();
    } else if (state === "reconnecting") {
      if (detail === "daemon unreachable") checkReachable();
      else raise("reconnecting", "Connection lost: reconnecting…");
    } else if (state === "unauthorized") {
      raise("unauthorized", WRONG_TOKEN);
    } else if (state === "gone") {
      this.log.append(el("div", { class: "note error" }, ["This session no longer exists."]));
    }
  }

  /** @param {any} s */
  showSnapshot(s) {
    if (!s || s.sessionId !== this.id) return;
    this.snapshot = s;
    $("session-title").textContent = visible(s.title || s.sessionId);
    $("session-meta").textContent = visible(
      `${s.model} · ${s.sessionId}${s.toolCallCount ? ` · ${s.toolCallCount} tool calls` : ""}`,
    );
    const state = sessionState(s);
    const badge = $("session-state");
    badge.hidden = !state;
    if (state) {
      badge.textContent = state.text;
      badge.className = `badge ${state.kind}`;
    }
    $("cancel").hidden = !s.activeTurnId;
  }

  async cancel() {
    const turnId = this.snapshot?.activeTurnId;
    if (!turnId) return;
    try {
      await api("POST", `/v3/sessions/${encodeURIComponent(this.id)}/cancel`, { turnId });
    } catch (error) {
      raise("notice", `Cancel failed: ${error instanceof Error ? error.message : error}`);
      setTimeout(() => settle("notice"), 6000);
    }
  }

  /** @param {string} content @param {string} mode */
  async submit(content, mode) {
    await api("POST", `/v3/sessions/${encodeURIComponent(this.id)}/turns`, {
      clientId: CLIENT_ID,
      writerId: WRITER_ID,
      content,
      mode,
    });
  }

  nearEnd() {
    return this.log.scrollHeight - this.log.scrollTop - this.log.clientHeight < 80;
  }

  scrollToEnd(now = false) {
    const go = () => {
      this.log.scrollTop = this.log.scrollHeight;
    };
    if (now) go();
    requestAnimationFrame(go);
  }

  close() {
    this.closed = true;
    if (this.stream) this.stream.close();
  }
}

/** A message's content as text (strings, or OpenAI content parts). @param {any} content */
function contentText(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    return content.map((part) => (typeof part === "string" ? part : part?.text || "")).join("");
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// The composer.

const prompt = /** @type {HTMLTextAreaElement} */ ($("prompt"));
const modeSelect = /** @type {HTMLSelectElement} */ ($("mode"));
modeSelect.value = localStorage.getItem(MODE_KEY) || "chat";
modeSelect.addEventListener("change", () => localStorage.setItem(MODE_KEY, modeSelect.value));

function grow() {
  prompt.style.height = "auto";
  prompt.style.height = `${prompt.scrollHeight + 2}px`;
}
prompt.addEventListener("input", grow);

prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    /** @type {HTMLFormElement} */ ($("composer")).requestSubmit();
  }
});

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && current && !dialog.open) {
    event.preventDefault();
    current.cancel();
  }
});

$("cancel").addEventListener("click", () => current?.cancel());

$("composer").addEventListener("submit", async (event) => {
  event.preventDefault();
  const content = prompt.value;
  if (!current || !content.trim()) return;
  const send = /** @type {HTMLButtonElement} */ ($("send"));
  send.disabled = true;
  try {
    await current.submit(content, modeSelect.value);
    prompt.value = "";
    grow();
  } catch (error) {
    raise("notice", `Not sent: ${error instanceof Error ? error.message : error}`);
    setTimeout(() => settle("notice"), 6000);
  } finally {
    send.disabled = false;
    prompt.focus();
  }
});

// Relative times in the list age while the page is open.
setInterval(scheduleList, 30000);

boot();
