// The daemon's v3 protocol as the page uses it: the token, HTTP calls, a session's event stream
// (WebSocket, resumed from the last seq after any drop) and the live session feed (SSE).

const TOKEN_KEY = "opta.token";

/** An HTTP answer that was not 2xx. */
export class ApiError extends Error {
  /** @param {number} status @param {any} body */
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

/** The stored token, or null. */
export function storedToken() {
  return localStorage.getItem(TOKEN_KEY);
}

/** @param {string} token */
export function storeToken(token) {
  localStorage.setItem(TOKEN_KEY, token);
}

export function forgetToken() {
  localStorage.removeItem(TOKEN_KEY);
}

/**
 * Calls a route with the token; resolves to the JSON body (null when empty).
 * @param {string} method @param {string} path @param {any} [body]
 */
export async function api(method, path, body) {
  /** @type {Record<string, string>} */
  const headers = {};
  const token = storedToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = { error: text };
  }
  if (!response.ok) throw new ApiError(response.status, json);
  return json;
}

/**
 * Trades a one-time sign-in code (from `opta web`'s link) for the token, and keeps it.
 * @param {string} code
 */
export async function redeemCode(code) {
  const answer = await api("POST", "/v3/web/exchange", { code });
  storeToken(answer.token);
}

function wsUrl(/** @type {string} */ sessionId, /** @type {number} */ afterSeq) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = new URLSearchParams({
    sessionId,
    afterSeq: String(afterSeq),
    token: storedToken() || "",
  });
  return `${scheme}//${location.host}/v3/ws?${query}`;
}

/**
 * A session's events, in seq order, each exactly once: replay from `afterSeq`, then live; after
 * a drop (network, sleep, daemon restart) it reconnects from the last seq it delivered.
 */
export class SessionStream {
  /**
   * @param {string} sessionId
   * @param {number} afterSeq
   * @param {{event: (e: any) => void, state: (s: "live"|"reconnecting"|"unauthorized"|"gone", detail?: string) => void}} handlers
   */
  constructor(sessionId, afterSeq, handlers) {
    this.sessionId = sessionId;
    this.lastSeq = afterSeq;
    this.handlers = handlers;
    this.closed = false;
    this.retryDelay = 250;
    /** @type {WebSocket | null} */
    this.socket = null;
    /** @type {number | undefined} */
    this.retryTimer = undefined;
    this.wake = () => this.reconnectNow();
    window.addEventListener("online", this.wake);
    document.addEventListener("visibilitychange", this.wake);
    this.connect();
  }

  connect() {
    if (this.closed) return;
    const socket = new WebSocket(wsUrl(this.sessionId, this.lastSeq));
    this.socket = socket;
    let opened = false;
    socket.onopen = () => {
      opened = true;
      this.retryDelay = 250;
      this.handlers.state("live");
    };
    socket.onmessage = (message) => {
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return;
      }
      // Envelopes only (acks and error frames carry no seq); each seq once, in order.
      if (frame.v !== "3" || typeof frame.seq !== "number" || frame.seq <= this.lastSeq) return;
      this.lastSeq = frame.seq;
      this.handlers.event(frame);
    };
    socket.onclose = (close) => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (this.closed) return;
      if (close.code === 4001) {
        this.handlers.state("unauthorized");
        return;
      }
      if (close.code === 4004) {
        this.handlers.state("gone");
        return;
      }
      this.handlers.state("reconnecting", opened ? "connection lost" : "daemon unreachable");
      this.scheduleRetry();
    };
  }

  scheduleRetry() {
    clearTimeout(this.retryTimer);
    this.retryTimer = window.setTimeout(() => this.connect(), this.retryDelay);
    this.retryDelay = Math.min(this.retryDelay * 2, 4000);
  }

  /** After sleep or a network change: try at once rather than wait out the backoff. */
  reconnectNow() {
    if (this.closed || this.socket || document.visibilityState === "hidden") return;
    clearTimeout(this.retryTimer);
    this.retryDelay = 250;
    this.connect();
  }

  close() {
    this.closed = true;
    clearTimeout(this.retryTimer);
    window.removeEventListener("online", this.wake);
    document.removeEventListener("visibilitychange", this.wake);
    if (this.socket) this.socket.close(1000);
    this.socket = null;
  }
}

/**
 * The live session list: every create, change and delete, from the daemon's session feed.
 * `opened` is called whenever the feed (re)connects: re-list then, changes after it follow.
 */
export class SessionFeed {
  /**
   * @param {{opened: () => void, change: (item: any) => void, failed: () => void}} handlers
   */
  constructor(handlers) {
    this.handlers = handlers;
    this.closed = false;
    this.retryTimer = undefined;
    this.connect();
  }

  connect() {
    if (this.closed) return;
    const query = new URLSearchParams({ token: storedToken() || "" });
    const source = new EventSource(`/v3/sse/sessions?${query}`);
    this.source = source;
    source.onopen = () => this.handlers.opened();
    source.onmessage = (message) => {
      try {
        this.handlers.change(JSON.parse(message.data));
      } catch {
        /* not JSON: ignore */
      }
    };
    source.onerror = () => {
      // EventSource retries by itself while it can; a refused or failed answer closes it.
      if (source.readyState === EventSource.CLOSED) {
        this.handlers.failed();
        clearTimeout(this.retryTimer);
        this.retryTimer = setTimeout(() => this.connect(), 2000);
      }
    };
  }

  /** Reconnects now unless the feed is open. */
  reconnectIfDown() {
    if (this.closed || this.source?.readyState === EventSource.OPEN) return;
    if (this.source) this.source.close();
    clearTimeout(this.retryTimer);
    this.connect();
  }

  close() {
    this.closed = true;
    clearTimeout(this.retryTimer);
    if (this.source) this.source.close();
  }
}
